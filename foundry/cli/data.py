"""`foundry tokenizer train` and `foundry prepare`: corpora -> a tokenizer -> token shards."""

from __future__ import annotations

import argparse

from foundry.cli.parsing import HelpFormatter, add_verb


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from foundry.data.corpus import train_tokenizer

    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.out, glob=args.glob, field=args.field,
                                overwrite=args.overwrite)
    print(f"trained a {tokenizer.vocab_size:,}-token byte-level BPE -> {args.out}")


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", required=True, metavar="stdlib|stdlib-all|PATH",
                   help="`stdlib` (the embedded Python standard library without its generated data modules: "
                        "pydoc_data, the encodings/ charmap tables, _sysconfigdata, stringprep, re/_casefix, "
                        "html/entities), `stdlib-all` (all of it), text files, directories or .jsonl files")
    p.add_argument("--glob", default="**/*", help="files to read inside directories (default **/*)")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default text)")


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="Train tokenizers.", description="Train tokenizers.",
                       formatter_class=HelpFormatter)
    verbs = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = add_verb(verbs, "train", _cmd_tokenizer_train,
             "Train a byte-level BPE tokenizer (with ChatML special tokens and chat template) on every document "
             "of the corpus, train and validation alike.")
    _add_corpus_flags(t)
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer already in --out (all its files as one set, never a mix)")


# ---- prepare ----------------------------------------------------------------------------

def _cmd_prepare(args: argparse.Namespace) -> None:
    from foundry.cli.progress import PrepareBar
    from foundry.data.shards import prepare, summary

    with PrepareBar() as bar:
        meta = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction, glob=args.glob,
                       field=args.field, overwrite=args.overwrite, progress=bar)
    print(summary(meta, args.out))


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "prepare", _cmd_prepare, "Tokenize a corpus into train/validation token shards.")
    _add_corpus_flags(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (from `foundry tokenizer train`)")
    p.add_argument("--out", required=True, help="DATA_DIR to create")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation, chosen by a hash of their names "
                        "(default 0.05; at least one document)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DATA_DIR (only once the new one is complete)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` and `prepare` verbs."""
    _add_tokenizer(sub)
    _add_prepare(sub)
