"""The `twofile` command (also `python -m twofile`).

    twofile run                                  # the default model, a short demo generation
    twofile run MODEL.gguf -p "Once upon a time" -n 64 --temperature 0.8 --seed 1
    twofile chat [MODEL.gguf]                    # interactive chat with the model's template
    twofile data fetch-default                   # the default corpus into the cache
    twofile tokenizer train [CORPUS...] --vocab-size 8192 -o tok.json
    twofile data prepare [CORPUS...] --tokenizer tok.json -o data/ [--val-fraction 0.01]
"""

from __future__ import annotations

import argparse
import sys

from twofile import assets, run


def _model_path(args) -> str:
    return args.model or str(assets.fetch(assets.DEFAULT_MODEL))


def _corpus(args) -> list[str]:
    return args.corpus or [str(assets.fetch(assets.DEFAULT_CORPUS))]


def _add_corpus_args(p: argparse.ArgumentParser):
    p.add_argument("corpus", nargs="*", help="files, folders, - for stdin (default: Shakespeare's works)")
    p.add_argument("--field", default="text", help="the text field of .jsonl lines / column of .parquet files")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) bad lines and files instead of failing")


def tokenizer_train(args) -> None:
    from twofile import data, tokenizer

    if args.vocab_size < tokenizer.MIN_VOCAB:  # before reading a possibly large corpus
        tokenizer.train([], args.vocab_size)
    tok = tokenizer.train(data.texts(_corpus(args), args.field, args.skip_bad), args.vocab_size)
    tokenizer.save(tok, args.output)
    print(f"{args.output}: {tok.get_vocab_size()} tokens, fingerprint {tokenizer.fingerprint(tok)}", file=sys.stderr)


def data_prepare(args) -> None:
    from twofile import data

    data.prepare(_corpus(args), args.tokenizer, args.output, args.val_fraction, args.field, args.skip_bad, args.force)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="twofile", description="The whole life of a language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("run", "continue a prompt with a GGUF model"),
                       ("chat", "chat with a GGUF model, using its chat template")):
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("model", nargs="?", default=None,
                       help=f"a .gguf file (default: {assets.DEFAULT_MODEL.name}, fetched once)")
        run.add_generation_args(p)
        p.set_defaults(action=lambda a: (run.run_chat if a.command == "chat" else run.run_prompt)(_model_path(a), a))

    data_parser = commands.add_parser("data", help="corpora and token shards").add_subparsers(dest="data", required=True)
    p = data_parser.add_parser("fetch-default", help="fetch the default corpus (Shakespeare) into the cache")
    p.set_defaults(action=lambda a: print(assets.fetch(assets.DEFAULT_CORPUS)))
    p = data_parser.add_parser("prepare", help="tokenize a corpus into train/val shards")
    _add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json from `twofile tokenizer train`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--force", action="store_true", help="replace shards of another tokenizer or corpus")
    p.set_defaults(action=data_prepare)

    tok_parser = commands.add_parser("tokenizer", help="BPE tokenizers").add_subparsers(dest="tokenizer", required=True)
    p = tok_parser.add_parser("train", help="train a byte-level BPE tokenizer")
    _add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("-o", "--output", default="tok.json", help="where to write tokenizer.json")
    p.set_defaults(action=tokenizer_train)

    args = parser.parse_args(argv)
    return run.guarded(args.action, args)


if __name__ == "__main__":
    sys.exit(main())
