"""Train a sentencepiece BPE model with our special ids, or add them to an existing model.

New model: pad=0, bos=1, eos=2, <boi>=3, <eoi>=4, unk=5 (the defaults of the config's
`model.tokens`), trained lossless (no normalization, whitespace/newlines kept via byte fallback,
digits split). <boi>/<eoi> are *control* symbols, so the literal text "<boi>" in a caption never
encodes to them. Existing model (`--base`): any of <boi>, <eoi>, pad, bos, eos it lacks are appended
at the end of the vocab as control pieces (existing ids and encodings are unchanged).

Writes `<out>.model`, `<out>.vocab` (new models) and `<out>.special_tokens.json` holding the ids
and `vocab_size`, for checking the training config.

    python -m data_prep.train_tokenizer --input corpus/*.txt --out tok/tokenizer --vocab-size 32000
    python -m data_prep.train_tokenizer --base llama.model --out tok/tokenizer
"""

from __future__ import annotations

if not __package__: import _as_package  # noqa: E701,F401 - run as a file: see data_prep/_as_package.py

import argparse
import dataclasses
import glob
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from config import SpecialTokens

from .cli import run_tool
from .tokenizer import BOI_PIECE, EOI_PIECE, Tokenizer, special_tokens_path

log = logging.getLogger("data_prep.train_tokenizer")
EXPECTED_IDS = dataclasses.asdict(SpecialTokens())  # the model config's defaults: pad 0, bos 1, eos 2, boi 3, eoi 4
UNK_ID = 5


def _expand(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        for h in hits:
            if os.path.isdir(h):
                files += sorted(str(f) for f in Path(h).rglob("*") if f.is_file())
            elif os.path.isfile(h):
                files.append(h)
            else:
                raise FileNotFoundError(f"tokenizer input {h} does not exist")
    if not files:
        raise FileNotFoundError(f"no tokenizer input files match {list(patterns)}")
    return files


def write_special_tokens(model_path: Path) -> dict:
    """Load `model_path`, check its special tokens and write `<name>.special_tokens.json`."""
    tok = Tokenizer(model_path)
    info = {**tok.special_tokens(), "unk": tok.sp.unk_id(), "vocab_size": tok.vocab_size,
            "model": model_path.name}
    with open(special_tokens_path(model_path), "w") as f:
        json.dump(info, f, indent=2)
    return info


def train_new(
    inputs: Sequence[str],
    out: str | Path,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 2,
    max_sentence_length: int = 16384,
    nfkc: bool = False,
) -> dict:
    """Train a fresh model at `<out>.model` with pad/bos/eos/<boi>/<eoi> = 0..4; returns the ids."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = _expand(inputs)
    spm.SentencePieceTrainer.train(
        input=files,
        model_prefix=str(out),
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=EXPECTED_IDS["pad"],
        bos_id=EXPECTED_IDS["bos"],
        eos_id=EXPECTED_IDS["eos"],
        unk_id=UNK_ID,
        control_symbols=[BOI_PIECE, EOI_PIECE],  # fill the free ids 3, 4 in this order
        byte_fallback=byte_fallback,
        # Lossless by default (Llama-style): no Unicode normalization, whitespace and newlines kept
        # (newlines/tabs become byte pieces), digits split one by one.
        normalization_rule_name="nmt_nfkc" if nfkc else "identity",
        remove_extra_whitespaces=nfkc,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        hard_vocab_limit=False,  # small corpora get a smaller vocab instead of an error
        num_threads=num_threads,
        minloglevel=2,
    )
    model_path = out.with_name(out.name + ".model")
    info = write_special_tokens(model_path)
    got = {k: info[k] for k in EXPECTED_IDS}
    if got != EXPECTED_IDS or info["unk"] in EXPECTED_IDS.values():
        raise RuntimeError(f"sentencepiece put the special tokens at {got} (unk {info['unk']}), "
                           f"expected {EXPECTED_IDS}; this sentencepiece version changed its id layout")
    return info


def extend_existing(base: str | Path, out: str | Path) -> dict:
    """Copy `base` to `<out>.model`, appending missing <boi>/<eoi>/pad/bos/eos control pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base).read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(base))
    spec = proto.trainer_spec
    control = pb.ModelProto.SentencePiece.CONTROL
    wanted = [
        (BOI_PIECE, sp.piece_to_id(BOI_PIECE) == sp.unk_id()),
        (EOI_PIECE, sp.piece_to_id(EOI_PIECE) == sp.unk_id()),
        (spec.pad_piece or "<pad>", sp.pad_id() < 0),
        (spec.bos_piece or "<s>", sp.bos_id() < 0),
        (spec.eos_piece or "</s>", sp.eos_id() < 0),
    ]
    existing = {p.piece: i for i, p in enumerate(proto.pieces)}
    for piece, missing in wanted:
        if not missing:
            continue
        if piece in existing:  # present as a normal piece: sentencepiece needs it to be CONTROL
            raise ValueError(f"{base} has '{piece}' as a non-control piece (id {existing[piece]}); "
                             f"pick another model or retrain with `--input`")
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, control
        log.info("appended %s at id %d", piece, len(proto.pieces) - 1)
    spec.pad_id = [i for i, p in enumerate(proto.pieces) if p.piece == (spec.pad_piece or "<pad>")][0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_path = out.with_name(out.name + ".model")
    model_path.write_bytes(proto.SerializeToString())
    return write_special_tokens(model_path)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the special-token info written next to the model."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="text files, globs or folders (one sentence per line)")
    src.add_argument("--base", help="existing sentencepiece .model to extend with our special tokens")
    ap.add_argument("--out", required=True, help="output prefix: writes <out>.model and <out>.special_tokens.json")
    ap.add_argument("--vocab-size", type=int, default=32000, help="target vocab size (soft limit)")
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument("--character-coverage", type=float, default=0.9995)
    ap.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                    help="map unknown characters to <unk> instead of UTF-8 byte pieces")
    ap.add_argument("--nfkc", action="store_true",
                    help="NFKC-normalize and collapse whitespace (default: lossless, newlines kept)")
    ap.add_argument("--input-sentence-size", type=int, default=2_000_000,
                    help="lines sampled from the input for training")
    ap.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.base:
        info = extend_existing(args.base, args.out)
    else:
        info = train_new(args.input, args.out, args.vocab_size, args.model_type,
                         args.character_coverage, args.byte_fallback, args.input_sentence_size,
                         args.num_threads, nfkc=args.nfkc)
    log.info("wrote %s.model (vocab %d, special ids %s) and %s", args.out, info["vocab_size"],
             {k: info[k] for k in EXPECTED_IDS}, special_tokens_path(args.out + ".model"))
    return info


def cli() -> None:
    """Console entry point (`transfusion-train-tokenizer`): errors a user must fix print as one line."""
    run_tool(main, "train_tokenizer")


if __name__ == "__main__":
    cli()
