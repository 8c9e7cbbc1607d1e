"""`sinkformer export`: a NULL in one fixed mode, as a standard LLaMA in the Hugging Face format.

In a fixed mode a NULL *is* a LLaMA: `backbone` keeps the G backbone units of every MLP (the
backbone rescale folded into the down projection), `source:REF` keeps G plus that source's
sink units, layer by layer, and, under the `exclude` policy, never a unit of an unlearned
source. Attention sink heads that are off are folded into the output projection (their
columns zeroed). Layers keep different numbers of units, so every MLP is padded with zero
units to the widest (a zero unit adds exactly nothing). The dense control exports whole.

Written to OUT: `config.json` (LlamaForCausalLM), `model.safetensors` (float32),
`generation_config.json`, the tokenizer (`tokenizer.model` + `tokenizer_config.json` for a
SentencePiece run; `tokenizer.json`, a word-level tokenizer, for the built-in corpus), and
`sinkformer.json` (the run, step, mode, source, policy and ledger position it reflects). An
unlearned source cannot be exported, by any of its names.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from sinkformer import checkpoint, config as config_lib

from sinkformer.errors import UserError
from sinkformer.model import sinks
from sinkformer.run import directory, switchboard
from sinkformer.serve import serving

FIXED_MODES = "backbone or source:REF"


def unit_masks(setup, mode_source: int | None, exclusion) -> tuple[np.ndarray, np.ndarray | None, float]:
  """(MLP units kept [L, G+P], attention heads kept [L, H] or None, backbone scale) of a
  fixed mode: `mode_source` None for backbone mode, else the source id."""
  spec, m = setup.spec, setup.dims
  layers = np.arange(m.num_layers) % spec.mask_layers
  seg = np.ones((1, 1), np.int32)
  gate = sinks.make_gate(spec, "backbone" if mode_source is None else "source", segment_ids=seg,
                         row_sources=None if mode_source is None else np.asarray([mode_source]),
                         exclude=exclusion)
  mlp = np.asarray(gate.mlp)[:, 0, 0]                                   # [Lm, P]
  units = np.concatenate([np.ones((spec.mask_layers, m.mlp_backbone), bool), mlp], 1)[layers]
  heads = None
  if gate.attn is not None:
    attn = np.asarray(gate.attn)[:, 0, 0]                               # [Lm, Ha]
    heads = np.concatenate([np.ones((spec.mask_layers, m.num_heads - attn.shape[1]), bool),
                            attn], 1)[layers]
  scale = 1.0 if gate.backbone_scale is None else float(gate.backbone_scale)
  return units, heads, scale


def llama_weights(params, dims, units: np.ndarray | None, heads: np.ndarray | None,
                  scale: float) -> tuple[dict, int]:
  """Hugging Face LLaMA tensors (name -> float32 [out, in]) and the intermediate size."""
  p = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
  L, hd = dims.num_layers, dims.head_dim
  width = dims.mlp_backbone + dims.num_sinks if units is None else int(units.sum(1).max())
  out = {"model.embed_tokens.weight": p["embed.embedding"], "model.norm.weight": p["final_norm.scale"]}
  if not dims.tie_embeddings:
    out["lm_head.weight"] = p["lm_head.kernel"].T
  for l in range(L):
    b = lambda name: p[f"blocks.{name}"][l]
    pre = f"model.layers.{l}"
    o = b("attn.o.kernel").copy()                                      # [H*hd, d]
    if heads is not None:
      o[np.repeat(~heads[l], hd)] = 0                                   # heads that are off
    out.update({f"{pre}.input_layernorm.weight": b("attn_norm.scale"),
                f"{pre}.post_attention_layernorm.weight": b("mlp_norm.scale"),
                f"{pre}.self_attn.q_proj.weight": b("attn.q.kernel").T,
                f"{pre}.self_attn.k_proj.weight": b("attn.k.kernel").T,
                f"{pre}.self_attn.v_proj.weight": b("attn.v.kernel").T,
                f"{pre}.self_attn.o_proj.weight": o.T})
    keep = np.arange(b("mlp.gate.kernel").shape[1]) if units is None else np.flatnonzero(units[l])
    pad = lambda w, axis: np.pad(w, [(0, width - w.shape[axis]) if a == axis else (0, 0)
                                     for a in range(2)])
    out.update({f"{pre}.mlp.gate_proj.weight": pad(b("mlp.gate.kernel")[:, keep], 1).T,
                f"{pre}.mlp.up_proj.weight": pad(b("mlp.up.kernel")[:, keep], 1).T,
                f"{pre}.mlp.down_proj.weight": pad(scale * b("mlp.down.kernel")[keep], 0).T})
  return {k: np.ascontiguousarray(v) for k, v in out.items()}, width


def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    out.update(_flat(v, name + ".") if isinstance(v, dict) else {name: v})
  return out


def llama_config(cfg, dims, width: int, tokenizer) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": dims.vocab_size, "hidden_size": dims.d_model, "intermediate_size": width,
      "num_hidden_layers": dims.num_layers, "num_attention_heads": dims.num_heads,
      "num_key_value_heads": dims.num_kv_heads, "head_dim": dims.head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.data.seq_len,
      "rms_norm_eps": dims.norm_eps, "rope_theta": dims.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": dims.rope_base},
      "tie_word_embeddings": dims.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eos, "pad_token_id": 0,
      "torch_dtype": "float32", "dtype": "float32"}


def write_tokenizer(tokenizer, identity: dict, out: str):
  """SentencePiece runs: their model file (LlamaTokenizer reads it); the built-in corpus: a
  word-level tokenizer.json (whitespace split, BOS prepended)."""
  if identity.get("corpus") == "builtin":
    words = tokenizer.words
    vocab = {w: i for i, w in enumerate(words)}
    special = {i: w for i, w in enumerate(words) if w.startswith("<")}
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, w in special.items()],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [tokenizer.bos],
                                                      "tokens": ["<s>"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}}
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
      json.dump(spec, f)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<pad>"}
  else:
    shutil.copy(os.path.join(identity["corpora"][0]["path"], "tokenizer.model"), out)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
              "add_eos_token": False, "legacy": False}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def export(run_dir: str, mode: str, out: str, step: int | None = None,
           policy: str | None = None) -> dict:
  """Write the run in a fixed mode to `out` (which must not exist); returns the record."""
  from safetensors.numpy import save_file
  if os.path.exists(out):
    raise UserError(f"{out} exists; export writes a new directory")
  run = directory.load_run(run_dir, step)
  board = switchboard.Switchboard(run_dir)
  try:
    policy = policy or run.cfg.unlearn.policy
    if policy not in config_lib.POLICIES:
      raise UserError(f"unknown policy {policy!r}; expected one of {config_lib.POLICIES}")
    source = None
    if mode.startswith("source:"):
      source = board.active(mode.split(":", 1)[1], "exported")     # refuses an unlearned source, by any name
    elif mode != "backbone":
      raise UserError(f"--mode {mode!r}: export needs a fixed mode, {FIXED_MODES} (route and "
                      "placebo pick a source per query)")
    unlearned, seq = board.unlearned_ids(), board.ledger_seq()
  finally:
    board.close()
  setup = run.setup
  if setup.spec is None:
    units = heads = None
    scale = 1.0
  else:
    exclusion = (sinks.exclusion(setup.spec, unlearned) if policy == "exclude" and unlearned
                 else None)
    units, heads, scale = unit_masks(setup, None if source is None else source["id"], exclusion)
  weights, width = llama_weights(run.params, setup.dims, units, heads, scale)
  tokenizer = serving.run_tokenizer(run.cfg, run.identity)
  tmp = out.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(llama_config(run.cfg, setup.dims, width, tokenizer), f, indent=2)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eos,
               "pad_token_id": 0}, f, indent=2)
  write_tokenizer(tokenizer, run.identity, tmp)
  record = {"run": os.path.abspath(run_dir), "step": run.step, "mode": mode,
            "source": None if source is None else {k: source[k] for k in ("id", "key", "title")},
            "policy": policy, "ledger_seq": seq, "unlearned_excluded": len(unlearned)
            if policy == "exclude" and setup.spec is not None else 0,
            "units_per_layer": None if units is None else units.sum(1).tolist(),
            "intermediate_size": width, "params_hash": checkpoint.params_hash(run.params),
            "kind": run.cfg.model.kind}
  with open(os.path.join(tmp, "sinkformer.json"), "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, out)
  return record
