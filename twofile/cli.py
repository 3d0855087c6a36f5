"""The `twofile` command (also `python -m twofile`).

    twofile run                                  # the default model, a short demo generation
    twofile run MODEL.gguf -p "Once upon a time" -n 64 --temperature 0.8 --seed 1
    twofile chat [MODEL.gguf]                    # interactive chat with the model's template
"""

from __future__ import annotations

import argparse
import sys

from twofile import assets, run


def _model_path(args) -> str:
    return args.model or str(assets.fetch(assets.DEFAULT_MODEL))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="twofile", description="The whole life of a language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("run", "continue a prompt with a GGUF model"),
                       ("chat", "chat with a GGUF model, using its chat template")):
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("model", nargs="?", default=None,
                       help=f"a .gguf file (default: {assets.DEFAULT_MODEL.name}, fetched once)")
        run.add_generation_args(p)
    args = parser.parse_args(argv)
    command = run.run_chat if args.command == "chat" else run.run_prompt
    return run.guarded(lambda: command(_model_path(args), args))


if __name__ == "__main__":
    sys.exit(main())
