"""The layering of the code: imports only point down, and docs/ARCHITECTURE.md's picture is the code's."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "docs", "tools", "import_graph.py")


def test_imports_point_down_and_the_picture_is_current():
    proc = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import import_graph
    finally:
        sys.path.pop(0)
    edges = import_graph.graph()
    assert "train" in edges["cli"] and not import_graph.upward(edges)
    edges["models"] = edges["models"] | {"train"}  # a model that imported the loop
    assert import_graph.upward(edges) == ["models -> train"]


def test_kernels_import_alone():
    code = "import sys, kernels; assert not [m for m in sys.modules if m == 'bype' or m.startswith('bype.')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
