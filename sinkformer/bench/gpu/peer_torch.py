"""The PyTorch peer of `sinkformer bench mfu`: a LLaMA-style decoder of the same geometry
(RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head), trained with AdamW in bf16
autocast and torch.compile, on the same rows per micro-batch and accumulation. Attention is
SDPA's causal kernel on unpacked rows (`--docs 1`) or, on rows packed with `--docs`
documents as sinkformer's are, flex attention with a document-causal block mask (on a CPU,
which flex cannot differentiate, SDPA with that mask as a dense boolean one). Prints tokens/s
as one JSON line. Runs wherever torch does (a CPU for a dry run with small sizes).

  python sinkformer/bench/gpu/peer_torch.py --layers 32 --rows 4 --accum 4 --docs 32
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

p = argparse.ArgumentParser()
for name, default in (("layers", 32), ("d_model", 960), ("heads", 15), ("kv_heads", 5),
                      ("head_dim", 128), ("mlp", 8192), ("vocab", 49152), ("seq_len", 1024),
                      ("rows", 4), ("accum", 4), ("docs", 32), ("steps", 10)):
  p.add_argument(f"--{name}", type=int, default=default)
p.add_argument("--no_compile", action="store_true")
args = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
H, KV, hd, T = args.heads, args.kv_heads, args.head_dim, args.seq_len


class RMSNorm(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.w = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.w


def rope(x, cos, sin):
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Block(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
    self.qkv = nn.Linear(d, (H + 2 * KV) * hd, bias=False)
    self.o = nn.Linear(H * hd, d, bias=False)
    self.gate_up = nn.Linear(d, 2 * args.mlp, bias=False)
    self.down = nn.Linear(args.mlp, d, bias=False)

  def forward(self, x, cos, sin, mask):
    b, t, _ = x.shape
    q, k, v = self.qkv(self.n1(x)).split([H * hd, KV * hd, KV * hd], -1)
    q = rope(q.view(b, t, H, hd).transpose(1, 2), cos, sin)
    k = rope(k.view(b, t, KV, hd).transpose(1, 2), cos, sin)
    v = v.view(b, t, KV, hd).transpose(1, 2)
    if mask is None:
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif isinstance(mask, torch.Tensor):
      a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
      a = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    x = x + self.o(a.transpose(1, 2).reshape(b, t, H * hd))
    g, u = self.gate_up(self.n2(x)).chunk(2, -1)
    return x + self.down(F.silu(g) * u)


class Model(nn.Module):
  def __init__(self, d=args.d_model):
    super().__init__()
    self.embed = nn.Embedding(args.vocab, d)
    self.blocks = nn.ModuleList([Block(d) for _ in range(args.layers)])
    self.norm, self.head = RMSNorm(d), nn.Linear(d, args.vocab, bias=False)
    freq = 1e5 ** (-torch.arange(hd // 2).float() / (hd // 2))
    angle = torch.arange(T).float()[:, None] * freq
    self.register_buffer("cos", angle.cos()[None, None])
    self.register_buffer("sin", angle.sin()[None, None])

  def forward(self, tokens, mask):
    x = self.embed(tokens)
    cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
    for block in self.blocks:
      x = block(x, cos, sin, mask)
    return self.head(self.norm(x))


mask = None
doc = torch.arange(T, device=dev) * args.docs // T   # documents of equal length, in order
if args.docs > 1 and dev == "cuda":
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  if not args.no_compile:
    flex_attention = torch.compile(flex_attention)

  def same_document(b, h, q, kv):
    return (q >= kv) & (doc[q] == doc[kv])
  mask = create_block_mask(same_document, None, None, T, T, device=dev)
elif args.docs > 1:
  pos = torch.arange(T, device=dev)
  mask = (pos[:, None] >= pos[None, :]) & (doc[:, None] == doc[None, :])

model = Model().to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=dev == "cuda")
forward = model if args.no_compile else torch.compile(model)
micro = args.rows
tokens = torch.randint(0, args.vocab, (micro * args.accum, T + 1), device=dev)


def step():
  for i in range(args.accum):
    rows = tokens[i * micro:(i + 1) * micro]
    with torch.autocast(dev, torch.bfloat16):
      logits = forward(rows[:, :-1], mask)
    loss = F.cross_entropy(logits.float().view(-1, args.vocab), rows[:, 1:].reshape(-1))
    (loss / args.accum).backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)


sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
t0 = time.perf_counter()
step()
sync()
first = time.perf_counter() - t0
step()
sync()
t0 = time.perf_counter()
for _ in range(args.steps):
  step()
sync()
step_s = (time.perf_counter() - t0) / args.steps
print(json.dumps({"bench": "peer", "attention": "sdpa" if mask is None else
                  "sdpa+mask" if isinstance(mask, torch.Tensor) else "flex",
                  "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
                  "layers": args.layers, "rows": micro, "accum": args.accum, "docs": args.docs,
                  "seq_len": T, "compile_and_first_step_s": first, "step_s": step_s,
                  "tokens_per_s": micro * args.accum * T / step_s, "torch": torch.__version__}))
