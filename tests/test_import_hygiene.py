"""engine/ never pulls in the UI (textual, plotext, cockpit); the CLI entry point stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "engine"
UI_PACKAGES = ("textual", "plotext", "cockpit")


def engine_modules() -> list[str]:
    top = [f"engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__"]
    return sorted(top + [f"engine.sample.{p.stem}" for p in (ENGINE / "sample").glob("*.py")])


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_importing_every_engine_module_loads_no_ui():
    modules = engine_modules()
    assert "engine.trainer" in modules and "engine.config" in modules and "engine.events" in modules
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
