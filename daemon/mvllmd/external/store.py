"""External servers on disk: `STATE_DIR/external/NAME.json` (the spec) and `NAME.key` (its API key, when it
has one), both mode 0600 in a 0700 directory: only mvllmd's user may read them. Written atomically, so a
reader never sees half a file; a damaged spec is left for a person to see and not loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mvllmd.errors import storage_error
from mvllmd.external.spec import ExternalSpec

log = logging.getLogger(__name__)


class ExternalStore:
    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "external"

    def spec_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def key_path(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def save(self, spec: ExternalSpec, api_key: str) -> None:
        """Write the key (if any), then the spec: a spec on disk always has its key beside it."""
        path = self.folder
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if api_key:
                path = self.key_path(spec.name)
                _write_private(path, api_key)
            path = self.spec_path(spec.name)
            _write_private(path, spec.to_json())
        except OSError as exc:
            self.remove(spec.name)
            raise storage_error(exc, "writing", path, "the server was not attached") from exc

    def remove(self, name: str) -> None:
        self.spec_path(name).unlink(missing_ok=True)
        self.key_path(name).unlink(missing_ok=True)

    def load(self) -> list[tuple[ExternalSpec, str]]:
        """Every saved spec, with its key ("" when it has none)."""
        found = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                spec = ExternalSpec.from_json(path.read_text())
                key_path = self.key_path(spec.name)
                key = key_path.read_text() if key_path.exists() else ""
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("external server file %s cannot be read (%s); left as it is", path, type(exc).__name__)
                continue
            found.append((spec, key))
        return found


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)
