"""Commands that train: the whole story, one run, sizing a run, reading a checkpoint."""

from __future__ import annotations

from absl import flags

from sinkformer.cli.common import Command
from sinkformer.config import define_config_flag


def _train_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_string("workdir", None, "run directory: config.json, metrics.jsonl, "
                      "sources.jsonl, tb/ (TensorBoard)", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "multi-process: HOST:PORT of process 0 (auto on "
                      "TPU VMs and SLURM)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "multi-process: how many processes", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)


def _train(fv):
  import jax
  from sinkformer.parallel import distributed
  from sinkformer.train import trainer
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  _, history = trainer.train(fv.config, fv.workdir)
  if jax.process_index() == 0:
    last = [h for h in history if "loss" in h and "split" not in h][-1:]
    print(f"done: {fv.config.train.steps} steps" + (f", loss {last[0]['loss']:.4f}" if last else "")
          + f"; the run (checkpoints, metrics.jsonl, tb/) is {fv.workdir}\n"
          f"next: sinkformer generate --run {fv.workdir} --prompt TEXT | sinkformer serve "
          f"--run {fv.workdir} | sinkformer unlearn --run {fv.workdir} --reason WHY SOURCE")


def _story_flags(fv, argv):
  _train_flags(fv, argv)
  flags.DEFINE_integer("people", 400, "articles in the generated encyclopedia", flag_values=fv)
  flags.DEFINE_integer("forget_count", 20, "how many sources to unlearn (drawn at random)",
                       flag_values=fv)
  flags.DEFINE_integer("attack_steps", 10, "steps of the post-hoc baselines and of the "
                       "relearning attack", flag_values=fv)


def _story(fv):
  from sinkformer.studies import story
  story.run(fv.config, fv.workdir, fv.people, fv.forget_count, posthoc_steps=fv.attack_steps,
            relearn_steps=fv.attack_steps)


def _sweep_flags(fv, argv):
  _train_flags(fv, argv)
  flags.DEFINE_list("points", None, "only these points (labels of sweep.points)", flag_values=fv)


def _sweep(fv):
  from sinkformer.studies import sweep
  sweep.run(fv.config, fv.workdir, fv.points)
  print(f"the regime map: {fv.workdir}/index.md")


def _checkpoint_info_flags(fv, argv):
  flags.DEFINE_string("checkpoint", None, "a run's checkpoints/ directory (newest step) or "
                      "checkpoints/STEP", flag_values=fv)


def _checkpoint_info(fv):
  import os
  from sinkformer import checkpoint
  from sinkformer.model import transformer
  from sinkformer.run import directory
  run = directory.load_run(fv.checkpoint)
  m, s, identity = run.cfg.model, run.cfg.sinks, run.identity
  data = ("corpus builtin" if identity.get("corpus") == "builtin" else
          "corpora " + "+".join(os.path.basename(c["path"]) for c in identity.get("corpora", []))
          + f", tokenizer {str(identity.get('tokenizer_sha256'))[:16]}")
  for key, value in {
      "checkpoint": f"{fv.checkpoint.rstrip('/').removesuffix(f'/{run.step}')}/{run.step}",
      "step": int(run.state["step"]),
      "model": f"{m.kind}, {m.num_layers} layers, d_model {m.d_model}, heads "
               f"{m.num_heads}/{m.num_kv_heads}x{m.head_dim}, vocab {m.vocab_size}",
      "sinks": f"G {m.mlp_backbone} + P {s.num}, k {s.k} ({s.selection}"
               f"{', per layer' if s.per_layer else ''}), seed {s.seed}",
      "data": data, "parameters": transformer.count_params(run.params),
      "hash": checkpoint.params_hash(run.params)}.items():
    print(f"{key}: {value}")


def _plan_flags(fv, argv):
  define_config_flag(fv, argv)
  flags.DEFINE_boolean("unrolled", False, "also compile the unrolled layout (blocks in a "
                       "Python loop) and compare compile times", flag_values=fv)
  flags.DEFINE_enum("platform", None, ["cuda", "tpu"], "also lower the train step for this "
                    "platform on an abstract mesh of the config's size (its attention kernels "
                    "included): proof that it compiles there, without the hardware",
                    flag_values=fv)


def _plan(fv):
  from sinkformer.train import plan
  plan.print_plan(plan.plan(fv.config, fv.unrolled))
  if fv.platform:
    got = plan.lower(fv.config, fv.platform)
    print(f"lowered for {got['platform']} on {got['devices']} device(s) {got['mesh']}: "
          f"{got['layers']} layers, attention {got['attention']} ({got['kernel_calls']} kernel "
          f"calls), remat {got['remat']}, in {got['seconds']:.1f} s "
          f"({got['stablehlo_bytes'] / 1e6:.1f} MB of StableHLO)")


COMMANDS = {
    "story": Command(
        "the whole experiment: encyclopedia, NULL, retrain oracle, dense control, "
        "post-hoc baselines, unlearning, and every measurement side by side",
        flags=_story_flags, action=_story, required=("config", "workdir")),
    "sweep": Command(
        "the regime map: per grid point the NULL, its retrain oracle and the dense "
        "control, trained and measured; one page of where sink-off forgets like a retrain",
        flags=_sweep_flags, action=_sweep, required=("config", "workdir")),
    "train": Command(
        "train a NULL (or the dense control) from an experiment config",
        flags=_train_flags, action=_train, required=("config", "workdir")),
    "plan": Command(
        "parameters, FLOPs/token and per-device memory of a config's mesh, before "
        "renting hardware (plus XLA's analysis when enough devices exist)",
        flags=_plan_flags, action=_plan, required=("config",)),
    "checkpoint info": Command(
        "step, config summary, parameter count and parameter hash of a "
        "checkpoint (restored on one CPU)",
        flags=_checkpoint_info_flags, action=_checkpoint_info, required=("checkpoint",)),
}
