"""engine/ never pulls in the UI (textual, plotext, cockpit); the cockpit reaches the engine only through
engine.api (the import contracts in pyproject.toml); the CLI entry point stays light."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "engine"
UI_PACKAGES = ("textual", "plotext", "cockpit")


def engine_modules() -> list[str]:
    names = (".".join(p.relative_to(REPO).with_suffix("").parts) for p in ENGINE.rglob("*.py"))
    return sorted(n.removesuffix(".__init__") for n in names if "assets" not in n.split("."))


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_importing_every_engine_module_loads_no_ui():
    modules = engine_modules()
    assert {"engine.trainer", "engine.config", "engine.events", "engine.run.journal", "engine.api"} <= set(modules)
    loaded = loaded_after("import engine\n" + "\n".join(f"import {m}" for m in modules))
    assert not loaded & set(UI_PACKAGES), loaded & set(UI_PACKAGES)


def test_engine_sources_never_import_ui():
    pattern = re.compile(r"^\s*(?:import|from)\s+(textual|plotext|cockpit)\b", re.M)
    offenders = [f"{p.relative_to(REPO)}: {m.group(0).strip()}"
                 for p in ENGINE.rglob("*.py") for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_engine_package_and_light_modules_do_not_import_torch():
    """The cockpit imports these on the UI thread: they must stay light."""
    assert (ENGINE / "__init__.py").read_text().strip() == "" or "torch" not in (ENGINE / "__init__.py").read_text()
    loaded = loaded_after("import engine, engine.config, engine.events, engine.control, engine.errors, "
                          "engine.cli_args, engine.plan, engine.sample.prompts, engine.sample.naming, "
                          "engine.sample.samplers")
    assert not loaded & {"torch", "diffusers", "transformers", "peft", *UI_PACKAGES}


def test_cockpit_cli_imports_neither_torch_nor_textual():
    loaded = loaded_after("import cockpit.cli")
    assert not loaded & {"torch", "textual", "plotext", "diffusers", "transformers"}


def test_import_contracts_hold_so_the_cockpit_uses_only_the_engine_api():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "lint-imports is missing: pip install -e '.[test]'"
    out = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout
