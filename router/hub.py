"""Saving, loading, pushing and format upgrades of a :class:`router.Router`: a mixin in the spirit of
``huggingface_hub.PyTorchModelHubMixin``. ``save_pretrained`` writes config.json + model.safetensors + README.md (a
model card); ``from_pretrained`` rebuilds the model from config.json and loads the weights with strict key checks and
checksums; ``push_to_hub`` uploads what ``save_pretrained`` writes.

>>> model.save_pretrained("runs/x/final")
>>> Router.from_pretrained("runs/x/final")
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

from backbone_router.extractors.factory import local_files_needed
from backbone_router.extractors.io.atomic import atomic_save_safetensors, verify_checksums
from backbone_router.extractors.io.model_files import resolve_model_dir
from backbone_router.extractors.io.weights import key_problems
from backbone_router.extractors.local_dir import local_dir_architecture

from .card import router_card, write_card
from .config import FORMAT_VERSION, RouterConfig, load_yaml_or_json
from .saved import paths_for_loading, paths_for_saving

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
Model = TypeVar("Model", bound="RouterHubMixin")


class RouterHubMixin:
    """save_pretrained / push_to_hub / from_pretrained for a model with ``config`` (a RouterConfig), ``extractors``
    (name -> Extractor) and ``extractor_names``, built by ``cls(config, text_embeddings=...)``."""

    def saved_extractors(self) -> list[str]:
        """Extractors whose weights a spec cannot rebuild: random, trainable, or unfrozen in training."""
        out = []
        for ecfg in self.config.extractors:
            ext = self.extractors[ecfg.name]
            trained = any(p.requires_grad for p in ext.parameters())
            if not ecfg.pretrained or not ecfg.frozen or ecfg.unfreeze_last > 0 or trained:
                out.append(ecfg.name)
        return out

    def save_pretrained(self, directory: str | os.PathLike, full: bool = False,
                        card_data: dict | None = None) -> Path:
        """Write config.json + model.safetensors + README.md (a model card with Hub metadata).

        By default, frozen pretrained extractors are left out (their specs rebuild them). `card_data` adds what
        only the caller knows to the card: metrics, gate weights per task and level, datasets, license, a gate
        heatmap image (see :mod:`router.card`).

        >>> model.save_pretrained("runs/x/final", card_data={"metrics": {"demo_seg": {"mIoU": 0.71}}})
        >>> Router.from_pretrained("runs/x/final")
        """
        directory = Path(directory)
        saved = self.extractor_names if full else self.saved_extractors()
        card = router_card(self.config, {n: e.info for n, e in self.extractors.items()}, saved, card_data)
        skip = tuple(f"extractors.{n}." for n in self.extractor_names if n not in saved)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}
        metadata = {"format": "backbone-router", "saved_extractors": json.dumps(saved)}
        atomic_save_safetensors(state, directory / WEIGHTS_NAME, metadata=metadata)
        config = RouterConfig.from_dict(self.config.to_dict())
        for ecfg in config.extractors:  # a saved local-dir extractor rebuilds without its folder
            if ecfg.name in saved and (arch := local_dir_architecture(ecfg.spec)) is not None:
                ecfg.kwargs = {**ecfg.kwargs, "architecture": arch}
            paths_for_saving(ecfg, directory, pinned=ecfg.name not in saved)
        config.save_json(directory / CONFIG_NAME)
        write_card(directory, card, card_data, self.config, {n: e.info for n, e in self.extractors.items()})
        return directory

    def push_to_hub(self, repo_id: str, private: bool | None = None,
                    commit_message: str = "Upload backbone-router model", token: str | None = None,
                    full: bool = False, card_data: dict | None = None, revision: str | None = None) -> str:
        """Create (or reuse) the Hub repo `repo_id` and upload what `save_pretrained` writes, card included.

        Every extractor must be rebuildable on another machine: one left out of model.safetensors (frozen,
        pretrained) whose spec or checkpoint is a local file or dir is an error unless ``full=True`` (which uploads
        every extractor's weights); one whose weights are uploaded needs only its architecture, which a hub or
        library name gives, and ``local-dir:`` / ``timm:local-dir:`` folders too (config.json keeps theirs), but
        ``open_clip:local-dir:`` and ``hf:<dir>`` folders do not: an error. Returns the commit URL.

        >>> model.push_to_hub("org/my-router", private=True)
        >>> Router.from_pretrained("org/my-router")
        """
        from huggingface_hub import HfApi

        saved = self.extractor_names if full else self.saved_extractors()
        needs = {e.name: need for e in self.config.extractors
                 if (need := local_files_needed(e.spec, e.checkpoint, weights_saved=e.name in saved))}
        if weights := [n for n in needs if n not in saved]:
            raise ValueError(
                f"push_to_hub: extractor(s) {weights} take their weights from a local file or dir "
                f"({[needs[n] for n in weights]}) that a user of the Hub repo does not have; pass full=True to "
                "upload their weights too")
        if needs:
            raise ValueError(
                f"push_to_hub: extractor(s) {list(needs)} need {list(needs.values())}, which is not uploaded and "
                "a user of the Hub repo does not have; name the model by its hub id (hf:<org/repo>, "
                "open_clip:hf-hub:<org/repo>) or save it in timm's format (timm:local-dir:<dir>)")
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        with tempfile.TemporaryDirectory(prefix="backbone_router_push_") as tmp:
            self.save_pretrained(tmp, full=full, card_data={"model_id": repo.repo_id, **(card_data or {})})
            commit = api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, commit_message=commit_message,
                                       token=token, revision=revision)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(cls: type[Model], name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None, map_location: str = "cpu") -> Model:
        """Rebuild from config.json, then load model.safetensors with strict key checks and checksums.

        Args:
            name_or_path: a save_pretrained directory, or a Hub repo id ("org/name") found in the HF cache
                (and on the hub unless offline) through ``huggingface_hub.snapshot_download``.
            revision, cache_dir, token: as in ``snapshot_download`` (a branch, tag or commit hash).
            local_files_only: only the HF cache; None means "when HF_HUB_OFFLINE is set".
            map_location: device the tensors are read to.

        Unexpected keys are an error; missing keys are allowed only for frozen pretrained extractors,
        which the extractor specs rebuild.

        >>> model = Router.from_pretrained("org/my-router", revision="main")
        """
        directory = resolve_model_dir(name_or_path, (CONFIG_NAME, WEIGHTS_NAME), what="Router.from_pretrained",
                                      revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                      token=token)
        from_hub = directory != Path(os.fspath(name_or_path)).expanduser()  # a snapshot: only its own files
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        raw = load_yaml_or_json(config_path)
        config = RouterConfig.from_dict(raw, where=str(config_path))
        try:
            with safe_open(str(weights_path), framework="pt", device=map_location) as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
        verify_checksums(state, metadata, str(weights_path))
        if raw.get("format_version", FORMAT_VERSION) < 2:
            state = upgrade_state_v1(state, config)
        try:
            saved = json.loads(metadata["saved_extractors"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{weights_path}: metadata 'saved_extractors' missing or not JSON; not a Router checkpoint") from e
        unknown = set(saved) - {e.name for e in config.extractors}
        if unknown:
            raise ValueError(f"{weights_path}: saved_extractors {sorted(unknown)} are not in {config_path}")
        for ecfg in config.extractors:  # paths against this folder; frozen local weights checked against sha256
            paths_for_loading(ecfg, directory, from_hub, str(config_path), pinned=ecfg.name not in saved)
        # Extractors saved here need no weights from their spec (which may be unavailable offline).
        load_cfg = RouterConfig.from_dict(config.to_dict())
        for ecfg in load_cfg.extractors:
            if ecfg.name in saved:
                ecfg.pretrained = False
        text = None
        if config.fusion == "gated" and config.gate.task_embedding == "text":  # saved: no text encoder needed
            keys = {t.name: f"gate.task_vectors.{t.name}" for t in config.tasks}
            if missing := [k for k in keys.values() if k not in state]:
                raise ValueError(f"{weights_path}: missing keys {missing} (the tasks' text embeddings)")
            text = {name: state[k] for name, k in keys.items()}
        model = cls(load_cfg, text_embeddings=text)
        model.config = config
        model.load_checked(state, saved, str(weights_path))
        return model

    def load_checked(self, state: dict[str, torch.Tensor], saved: list[str], source: str) -> None:
        """Load `state`; every key must be known, and all but frozen pretrained extractors' present."""
        own = self.state_dict()
        skip = tuple(f"extractors.{n}." for n in self.extractor_names if n not in saved)
        if problems := key_problems(own, state, expected={k for k in own if not k.startswith(skip)}):
            raise ValueError(f"{source}: does not fit the model in its config.json: " + "; ".join(problems))
        self.load_state_dict(state, strict=False)


def upgrade_state_v1(state: dict[str, torch.Tensor], config: RouterConfig) -> dict[str, torch.Tensor]:
    """Keys of a format-1 (one grid) checkpoint -> the one-level names: ``aligners.<e>.proj.*`` becomes
    ``aligners.<e>.levels.<stride>.proj.*`` (norm alike) and ``concat_proj.*`` becomes ``concat_proj.<stride>.*``.
    The tensors are unchanged."""
    level = str(config.strides[0])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "aligners" and len(parts) > 2 and parts[2] in ("proj", "norm"):
            key = ".".join([*parts[:2], "levels", level, *parts[2:]])
        elif parts[0] == "concat_proj":
            key = ".".join(["concat_proj", level, *parts[1:]])
        out[key] = value
    return out

