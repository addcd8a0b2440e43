"""Data config: the synthetic source or streams of prepared shards, and the document recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import ConfigError, require
from .model import ModelConfig

@dataclass
class SyntheticDataConfig:
    """A built-in, learnable document source (class-conditional images, Markov-chain text)."""

    num_classes: int = 10
    text_len_min: int = 16
    text_len_max: int = 96
    image_noise: float = 0.1
    # > 1: an image document holds 1..N (uniform) caption-image pairs in a row, an interleaved document
    # (e.g. to plan memory for multi-image data); 1: caption-image pairs under the paper's recipe
    images_per_document: int = 1


@dataclass
class DocumentRecipeConfig:
    """How the parts of an interleaved stream's documents are trained (stored roles, or one role for all).

    Classifier-free-guidance dropout, one draw per document: with `drop_context` its context text
    parts are removed, with `drop_condition` its condition images, with `drop_both` both (disjoint
    events, so an editing run trains the unconditional, image-only and instruction-only cases that
    two guidance scales need).
    """

    text: Literal["stored", "text", "context"] = "stored"  # text parts: as stored, all trained, all context
    image: Literal["stored", "generate", "condition"] = "stored"  # image parts: as stored, or all one role
    drop_context: float = 0.0
    drop_condition: float = 0.0
    drop_both: float = 0.0
    # A document longer than train.seq_len is cut at text positions (never through an image) into
    # row-sized pieces; false: such a document is skipped and counted (e.g. an edit: its target
    # image would lose its source).
    split_long: bool = True


@dataclass
class StreamConfig:
    """One set of MDS shards written by data_prep/, or a Megatron-LM indexed dataset (kind: megatron)."""

    path: str  # local shard folder (with `remote`: the local cache folder); megatron: the .bin/.idx prefix
    # image_tokens: VQ codes (image_representation=tokens); interleaved: documents (data_prep.encode_documents)
    kind: Literal["image", "text", "megatron", "image_tokens", "interleaved"]
    proportion: float = 1.0  # share of sequence positions (tokens) drawn from this stream
    remote: str | None = None  # object-store URL of the shards, streamed into `path` (not for megatron)
    # kind: megatron only (trainer/megatron_corpus.py):
    tokenizer: str | None = None  # what the corpus was tokenized with; recorded in the checkpoint's config
    add_bos: bool = True  # prepend BOS to each document
    add_eos: bool = False  # append EOS: for corpora made without preprocess_data.py --append-eod
    # the corpus's EOD id. eos: the model's EOS (or no EOD) - every Megatron tokenizer but one. legacy:
    # made with Megatron-LM's legacy SentencePiece wrapper (--tokenizer-type SentencePieceTokenizer up to
    # megatron-core 0.14, --legacy-tokenizer since), whose EOD is V + 2 (V = the text vocabulary): it
    # becomes EOS; the wrapper's <CLS>/<SEP>/<MASK> ids are refused (data_prep/megatron_reader.py)
    eod: Literal["eos", "legacy"] = "eos"
    recipe: DocumentRecipeConfig = field(default_factory=DocumentRecipeConfig)  # kind: interleaved only


@dataclass
class DataConfig:
    source: Literal["synthetic", "streaming"] = "synthetic"
    streams: list[StreamConfig] = field(default_factory=list)  # for source: streaming
    shuffle: bool = True
    shuffle_block: int = 1 << 16  # streaming: samples are shuffled within blocks of this many positions
    max_caption_tokens: int = 128  # longer captions are cut
    sample_latents: bool = True  # draw each latent from the stored posterior (else use its mean)
    text_fraction: float = 0.5  # synthetic source: share of documents that are text-only
    image_first_prob: float = 0.2
    caption_dropout: float = 0.1
    image_first_max_t: int = 500
    max_waiting_images: int = 4  # image documents the packer may hold back before padding a row
    prefetch: int = 2  # steps of micro-batches built ahead in a background thread (trainer/prefetch.py); 0: off
    prepare: str = ""  # the command that makes this config's shards, named when they are missing ("": the data_prep tool)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def validate(self, m: ModelConfig, seq_len: int, num_timesteps: int) -> None:
        """Checks of the document recipe and the streams against the model and the row length."""
        for name in ("text_fraction", "image_first_prob", "caption_dropout"):
            v = getattr(self, name)
            require(0 <= v <= 1, f"data.{name} must lie in [0, 1], got {v}")
        require(self.source == "streaming" or m.image_representation == "latent", "model.image_representation=tokens "
                "reads images from image_tokens shards: set data.source=streaming with a stream of kind image_tokens")
        if self.source == "streaming":
            require(bool(self.streams), "data.source=streaming needs at least one entry in data.streams")
            validate_streams(self.streams, "data.streams", m)
            require(
                self.max_caption_tokens + m.patches_per_image + 4 <= seq_len,
                f"an image document (data.max_caption_tokens={self.max_caption_tokens} + "
                f"{m.patches_per_image} patches + 4 special tokens) does not fit train.seq_len={seq_len}",
            )
        require(
            0 < self.image_first_max_t <= num_timesteps,
            f"data.image_first_max_t={self.image_first_max_t} must lie in (0, diffusion.num_timesteps]",
        )
        require(self.shuffle_block >= 1, "data.shuffle_block must be >= 1")
        require(self.prefetch >= 0, f"data.prefetch must be >= 0 (steps built ahead; 0: off), got {self.prefetch}")
        n = self.synthetic.images_per_document
        require(n >= 1, f"data.synthetic.images_per_document must be >= 1, got {n}")
        if self.source == "synthetic" and n > 1:
            need = n * (m.patches_per_image + 2 + 4) + 2  # each image with its 4-token class caption, BOS, EOS
            require(need <= seq_len, f"data.synthetic.images_per_document={n} makes documents of up to {need} "
                    f"positions ({m.patches_per_image} patches per image), more than train.seq_len={seq_len}")


def validate_streams(streams: list[StreamConfig], key: str, m: ModelConfig) -> None:
    """Checks of each stream under `key` (data.streams, eval.streams) against the model config."""
    for i, st in enumerate(streams):
        require(st.proportion > 0, f"{key}[{i}].proportion must be positive, got {st.proportion}")
        want = {"image": "latent", "interleaved": "latent", "image_tokens": "tokens"}.get(st.kind, m.image_representation)
        require(want == m.image_representation, f"{key}[{i}] is a {st.kind} stream, which needs "
                f"model.image_representation={want} (got {m.image_representation})")
        if st.kind == "megatron":
            require(bool(st.tokenizer), f"{key}[{i}].tokenizer: name what the Megatron corpus "
                    f"'{st.path}' was tokenized with (e.g. the tokenizer model's path), so runs record it")
            require(st.remote is None, f"{key}[{i}]: Megatron corpora are read in place, not "
                    "streamed (remote); convert it with `python -m data_prep.megatron_convert to-mds`")
            require(not (st.eod == "legacy" and st.add_eos), f"{key}[{i}].eod: legacy reads each "
                    "document's EOD as EOS, so add_eos: true would add a second one; set add_eos: false")
        else:
            require(st.eod == "eos", f"{key}[{i}].eod: {st.eod} is for kind: megatron streams "
                    f"(this one is {st.kind})")
        r = st.recipe
        if st.kind != "interleaved":
            require(r == DocumentRecipeConfig(), f"{key}[{i}].recipe is for kind: interleaved streams "
                    f"(this one is {st.kind})")
        drops = {name: getattr(r, name) for name in ("drop_context", "drop_condition", "drop_both")}
        for name, v in drops.items():
            require(0 <= v <= 1, f"{key}[{i}].recipe.{name} must lie in [0, 1], got {v}")
        require(sum(drops.values()) <= 1, f"{key}[{i}].recipe: drop_context + drop_condition + drop_both = "
                f"{sum(drops.values()):g} exceeds 1 (they are disjoint events of one draw)")


# How each kind of stream is prepared (named in the error when its shards are missing).
PREPARE_COMMAND = {
    "image": "python -m data_prep.encode_latents --input IMAGES --out {out} --vae VAE_DIR --tokenizer TOKENIZER.model",
    "text": "python -m data_prep.tokenize_text --input CORPUS --out {out} --tokenizer TOKENIZER.model",
    "image_tokens": "python -m data_prep.encode_vq_tokens --input IMAGES --out {out} --vq VQ_DIR --tokenizer TOKENIZER.model",
    "interleaved": "python -m data_prep.encode_documents --input DOCUMENTS --out {out} --vae VAE_DIR --tokenizer TOKENIZER.model",
}


def check_stream_shards(streams: list[StreamConfig], key: str = "data.streams", prepare: str = "") -> None:
    """Refuse local streams (under config key `key`) whose shard index is missing, before a model or
    GPU is touched.

    Remote streams (`remote:` set) are not checked: that would need the network, and `path` is
    only their cache folder. `prepare` (data.prepare) is the command the error names, when set.
    """
    for i, st in enumerate(streams):
        if st.remote is not None:
            continue
        if st.kind == "megatron":
            missing = [f"{st.path}{ext}" for ext in (".bin", ".idx") if not Path(f"{st.path}{ext}").is_file()]
            if missing:
                raise ConfigError(f"{key}[{i}] (Megatron corpus): {' and '.join(missing)} missing; "
                                  "`path` is the prefix given to Megatron-LM's --data-path")
            continue
        root = Path(st.path)
        index = root / "index.json"
        if index.is_file():
            continue
        if root.is_dir() and any(root.glob("part-*")):
            hint = f"merge the workers' parts with `python -m data_prep.merge_index {root}`"
        else:
            hint = f"prepare it with `{prepare or PREPARE_COMMAND[st.kind].format(out=root)}`"
        off = " (or turn evaluation off: eval.every=0)" if key.startswith("eval.") else ""
        raise ConfigError(
            f"{key}[{i}] ({st.kind} stream) has no shards: {index.absolute()} does not exist; "
            f"{hint}, or fix the path{off}"
        )
