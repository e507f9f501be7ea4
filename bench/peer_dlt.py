"""The dlt contender of :mod:`bench.peers`: run by the throwaway dlt venv's Python, not ours.

Run (by ``bench.peers``): ``<dlt-venv>/bin/python -m bench.peer_dlt CONFIG.json`` from the
repository root. It imports nothing of recarchive (dlt is not one of its dependencies): a
REST API source as in dlt's docs ("Per-resource parallelization for dependent resources"):
a resource yielding the IDs and a dependent resource ``recordings/{id}`` with
``parallelized: True`` (each parent item's fetch is a deferred call in dlt's thread pool,
``extract.workers`` threads), loaded to a local ``filesystem`` destination as Parquet.
With ``"variant": "transformer"`` in the config it runs dlt's other documented way instead
("Extract: parallelization"): a resource yielding the IDs one by one and a plain
``@dlt.transformer(parallelized=True)`` that returns the parsed answer of one GET (a
``requests`` session with a pool as large as the concurrency), so no REST-API-source overhead
is counted against dlt.
Prints one JSON line: the rows dlt loaded. :func:`dlt_python` (called by ``bench.peers``)
makes that venv.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DLT_SPEC = "dlt[parquet]"


def dlt_python(venv: Path) -> Path:
    """The Python of a virtual environment with dlt in it, made (once) when missing.

    Raises:
        SystemExit: dlt cannot be installed (no network to PyPI, no ``venv`` module, ...).
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import dlt, pyarrow; print(dlt.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    uv = shutil.which("uv") or next((str(p) for p in [ROOT / ".tools/bin/uv"] if p.exists()), None)
    if uv:
        steps = [
            [uv, "venv", "--python", sys.executable, str(venv)],
            [uv, "pip", "install", "--python", str(python), "--compile-bytecode", DLT_SPEC],
        ]
    else:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", DLT_SPEC],
        ]
    print(f"installing {DLT_SPEC} into {venv} (once) ...", flush=True)
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
        subprocess.run(check, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        output = getattr(exc, "stderr", None) or getattr(exc, "stdout", None) or str(exc)
        raise SystemExit(
            f"bench.peers: could not install {DLT_SPEC!r} into {venv}: {str(output)[-2000:]}\n"
            "(PyPI must be reachable; or run with --skip-dlt)"
        ) from exc
    return python


def dlt_version(python: Path) -> str:
    command = [str(python), "-c", "import dlt; print(dlt.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def configure(concurrency: int, folder: Path) -> None:
    """dlt's settings through its environment variables (its documented config layout)."""
    os.environ.update(
        {
            # As many fetches in flight as the other contenders have.
            "EXTRACT__WORKERS": str(concurrency),
            "EXTRACT__MAX_PARALLEL_ITEMS": str(concurrency * 2),
            # No internet here: the telemetry call would only wait for its timeout.
            "RUNTIME__DLTHUB_TELEMETRY": "false",
            "DLT_DATA_DIR": str(folder / "dlt-data"),
            "DESTINATION__FILESYSTEM__BUCKET_URL": (folder / "parquet").as_uri(),
        }
    )


def transformer_source(dlt: Any, config: dict[str, Any], ids: list[str]) -> Any:
    """IDs one by one into a ``parallelized`` transformer: one GET per call, in dlt's pool."""
    requests: Any = importlib.import_module("requests")
    session = requests.Session()
    pool = int(config["concurrency"])
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=pool))
    session.headers["Authorization"] = f"AccessKey {config['access_key']}"
    base = f"{config['api_url']}/workspaces/{config['workspace_id']}/recordings"

    def id_items() -> Any:
        for recording_id in ids:
            yield {"id": recording_id}

    def recording(item: dict[str, str]) -> Any:
        response = session.get(f"{base}/{item['id']}", timeout=30)
        response.raise_for_status()
        return response.json()

    parent = dlt.resource(id_items, name="ids", selected=False)
    return dlt.transformer(recording, data_from=parent, name="recordings", parallelized=True)


def main() -> None:
    """Load every ID's metadata; print the number of rows loaded."""
    config = json.loads(Path(sys.argv[1]).read_text())
    folder = Path(config["folder"])
    configure(int(config["concurrency"]), folder)
    dlt: Any = importlib.import_module("dlt")
    ids = Path(config["ids_file"]).read_text().split()
    pipeline = dlt.pipeline(
        pipeline_name="bench_peers",
        destination="filesystem",
        dataset_name="bird",
        pipelines_dir=str(folder / "pipelines"),
    )
    if config.get("variant") == "transformer":
        source = transformer_source(dlt, config, ids)
    else:
        source = rest_source(dlt, config, ids)
    info = pipeline.run(source, loader_file_format="parquet")
    info.raise_on_failed_jobs()
    rows = pipeline.last_trace.last_normalize_info.row_counts
    print(json.dumps({"rows": int(rows.get("recordings", 0)), "tables": dict(rows)}))


def rest_source(dlt: Any, config: dict[str, Any], ids: list[str]) -> Any:
    """dlt's REST API source, a dependent resource with ``parallelized: True``."""
    rest_api: Any = importlib.import_module("dlt.sources.rest_api")

    def pages() -> Any:
        # One page of parent items: the dependent resource defers one fetch per item.
        yield [{"id": recording_id} for recording_id in ids]

    id_items = dlt.resource(name="ids", selected=False)(pages)

    return rest_api.rest_api_source(
        {
            "client": {
                "base_url": f"{config['api_url']}/workspaces/{config['workspace_id']}/",
                "auth": {
                    "type": "api_key",
                    "name": "Authorization",
                    "api_key": f"AccessKey {config['access_key']}",
                    "location": "header",
                },
                "paginator": "single_page",
            },
            "resources": [
                id_items,
                {
                    "name": "recordings",
                    "parallelized": True,
                    "endpoint": {
                        "path": "recordings/{resources.ids.id}",
                        "data_selector": "$",
                        "paginator": "single_page",
                    },
                },
            ],
        }
    )


if __name__ == "__main__":
    main()
