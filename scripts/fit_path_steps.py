"""The fit pipeline's path as a reader follows it, counted on a run (issue 76 item 2's target).

Runs ``eek fit MODEL DATA OUT --calibration FILE`` in this process on the tests' tiny model (as
``scripts/fit_bytes.py`` does) under a profiler hook, and walks the package's functions the way a
reader follows the calls: depth first, each function once, where it is first entered from other
package code (class bodies and modules run at import left out). Counted:

- steps: functions walked to (the command line's ``main`` is the start, not a step);
- files: the distinct files of the walk, and the folders they sit in;
- returns: steps into a file the walk had already left (not the file of the step before);

``--below`` names the subpackages walked into (default: the fit's own, ``integrations training
calibration``); the forward of the model (``engine``, ``backends``, ``models``, ``methods``,
``patching``) is a call the reader takes as read unless named. The count depends on this
definition; it compares commits, not an outside count made by hand::

    python scripts/fit_path_steps.py /tmp/fit-path [--below integrations training calibration patching]
"""

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fit_bytes", ROOT_DIR / "scripts" / "fit_bytes.py")
fit_bytes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_bytes)  # the tiny model and rows, torch set to one thread

import earlyexit_kernels  # noqa: E402
from earlyexit_kernels.integrations.cli import main  # noqa: E402

PACKAGE = Path(earlyexit_kernels.__file__).resolve().parent
LAYERS = ("methods", "calibration", "backends", "engine", "models", "patching", "training", "integrations")


def _where(code) -> tuple[str, str] | None:
    """(file relative to the package, subpackage) of a code object in the package, else None."""
    try:
        path = Path(code.co_filename).resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    return str(path), (path.parts[0] if len(path.parts) > 1 else "")


def walk(argv: list[str], below: set[str]) -> list[tuple[str, str, int]]:
    """The (file, function, depth) steps of ``eek`` run with ``argv``: each package function of the
    subpackages in ``below`` once, depth first, where first entered from package code."""
    seen, steps = set(), []

    def hook(frame, event, arg):
        if event == "call":
            where = _where(frame.f_code)
            caller = frame.f_back
            if where is None or caller is None or _where(caller.f_code) is None:
                return
            file, sub = where
            key = (file, frame.f_code.co_qualname)
            # a function's body, not a class body or a module run at its import
            body = frame.f_code.co_flags & inspect.CO_NEWLOCALS and not frame.f_code.co_name.startswith("<")
            if sub in below and key not in seen and body:
                seen.add(key)
                steps.append((file, frame.f_code.co_qualname, _stack_depth(frame)))

    def _stack_depth(frame) -> int:
        count = 0
        while frame is not None:
            if _where(frame.f_code) is not None:
                count += 1
            frame = frame.f_back
        return count

    sys.setprofile(hook)
    try:
        status = main(argv)
    finally:
        sys.setprofile(None)
    if status != 0:
        raise SystemExit(f"eek fit ended with status {status}")
    return steps[1:]  # the first is main itself


def counts(steps: list[tuple[str, str, int]]) -> dict:
    files, returns, previous, visited = [], 0, None, set()
    for file, _, _ in steps:
        if file != previous and file in visited:
            returns += 1
        visited.add(file)
        if file not in files:
            files.append(file)
        previous = file
    folders = sorted({f.split("/")[0] for f in files if "/" in f})
    return {"steps": len(steps), "files": len(files), "folders": folders, "returns": returns}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder for the tiny model, the rows and the written folder")
    parser.add_argument("--below", nargs="+", default=["integrations", "training", "calibration"])
    parser.add_argument("--list", action="store_true", help="print every step")
    args = parser.parse_args()
    root = args.root
    plain = root / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    model, tokenizer = fit_bytes.word_bert(plain, 2, labels={0: "neg", 1: "pos"})
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    fit_bytes._frame(300, 1).to_csv(root / "train.csv", index=False)
    fit_bytes._frame(200, 2).to_csv(root / "cal.csv", index=False)
    argv = ["fit", plain, root / "train.csv", root / "out", "--calibration", root / "cal.csv"]
    argv += ["--no-progress", "--seed", "3", "--max-drop", "10", "--overwrite"]
    steps = walk([str(a) for a in argv], set(args.below))
    if args.list:
        for file, name, depth in steps:
            print(f"{'  ' * min(depth, 30)}{file}:{name}")
    print({"below": args.below, **counts(steps)})


if __name__ == "__main__":
    main_()
