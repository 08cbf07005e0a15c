"""The project's experiment presets, ``experiments/<name>.yaml``, served to Hydra as the config group ``experiment``.

Hydra names a config group after its folder, and the presets live in the repository's top-level ``experiments/``
folder. This config source (Hydra finds it in the ``hydra_plugins`` namespace) answers for one group only,
``experiment``, from that folder. Only a primary config that lists ``magnets-experiments://experiments`` in
``hydra.searchpath`` sees the group (``conf/config.yaml``: training and tokenization); in ``evaluate`` and
``sample`` ``experiment=`` is a plain key that names the run.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

REPOSITORY = Path(__file__).resolve().parents[3]
"""The repository root (this file is ``src/hydra_plugins/magnets_experiments/__init__.py``)."""
GROUP = "experiment"


class ExperimentPresets(ConfigSource):
    """``magnets-experiments://<folder>``: the ``*.yaml`` files of ``<folder>`` (relative to the repository root) as the
    options of the group ``experiment``."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.folder = REPOSITORY / self.path

    @staticmethod
    def scheme() -> str:
        return "magnets-experiments"

    def preset_file(self, config_path: str) -> Path | None:
        """The file of ``experiment/<name>`` (with or without ``.yaml``); None for any other path."""
        group, _, name = config_path.strip("/").partition("/")
        if group != GROUP or not name or "/" in name:
            return None
        return self.folder / self._normalize_file_name(name)

    def load_config(self, config_path: str) -> ConfigResult:
        path = self.preset_file(config_path)
        if path is None or not path.is_file():
            raise ConfigLoadError(f"Config not found: {config_path} (experiment presets: {self.folder})")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(OmegaConf.load(path)),
            path=self.full_path(),
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return self.folder.is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP) and self.available()

    def is_config(self, config_path: str) -> bool:
        path = self.preset_file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        config_path = config_path.strip("/")
        if config_path == "":
            wants_groups = results_filter in (None, ObjectType.GROUP)
            return [GROUP] if wants_groups and self.available() else []
        if config_path != GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(path.stem for path in self.folder.glob("*.yaml"))
