"""Import the training scripts of examples/ (not installed, not a package) for the tests.

`load_example("shapes10/train_var")` runs the file as the module `train_var`, as `python
examples/shapes10/train_var.py` would find it: its folder is on sys.path only while it loads (so that a script's
import of its sibling, e.g. train_llamagen's `from train_var import ...`, resolves to the same module object), and
the module stays in sys.modules under its file name.
"""
import importlib.util
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(relpath: str):
    path = os.path.join(EXAMPLES, relpath + ".py")
    name = os.path.splitext(os.path.basename(path))[0]
    mod = sys.modules.get(name)
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == path:
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return mod
