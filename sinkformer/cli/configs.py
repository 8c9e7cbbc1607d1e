"""Reading experiment configs: every field of one, resolved, and the presets it offers."""

from __future__ import annotations

from sinkformer import config as config_lib
from sinkformer.cli.common import Command


def _show_flags(fv, argv):
  config_lib.define_config_flag(fv, argv)


def _show(fv):
  spec = fv["config"].config_filename
  resolved, base = config_lib.fields(fv.config), config_lib.fields(config_lib.base())
  presets = config_lib.presets_of(spec)
  print(f"# {spec}: presets after ':' (comma-separated, applied in order)")
  for name, changes in presets.items():
    shown = ", ".join(f"{k}={v!r}" for k, v in changes.items())
    print(f"#   {name}: {shown if len(shown) < 160 else shown[:157] + '...'}")
  if not presets:
    print("#   (none)")
  print("# fields, resolved (override one with --config.SECTION.FIELD=VALUE); '*' differs "
        "from the base config")
  width = max(map(len, resolved))
  for name, value in resolved.items():
    differs = name not in base or base[name] != value
    shown = repr(value)
    print(f"{'*' if differs else ' '} {name:{width}s} = "
          f"{shown if len(shown) < 120 else shown[:117] + '...'}"
          + (f"   (base: {base[name]!r})" if differs and name in base else ""))


COMMANDS = {
    "config show": Command(
        "every field of an experiment config (presets and overrides applied), "
        "what differs from the base, and the presets it offers",
        flags=_show_flags, action=_show, required=("config",)),
}
