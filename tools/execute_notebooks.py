"""Execute the notebooks of nbs/ in place, so that they are committed with their outputs.

`make docs-refresh` runs it. Each notebook runs top to bottom on the `movierec` kernel (installed
in .venv by `make setup`) in its own folder, skipping the cells `nbdev_test` skips (`#| eval: false`,
the test flags of settings.ini such as `#| slow`, an `nbdev_export()` call) so that what a reader
sees is what the tests ran. The kernel gets MOVIEREC_PROGRESS=log and TQDM_DISABLE=1 (no progress
bars, no widgets), matplotlib's inline backend (figures as image/png) and PYTHONHASHSEED=0.

The outputs are then tidied (`tidy_outputs`): stderr streams (log lines, harmless warnings) and
widget views are dropped, carriage-return debris is collapsed, absolute paths of this machine
(the project folder, the home folder, temporary folders) are redacted, and PNGs are downscaled
until each is at most `MAX_PNG_WIDTH` pixels wide and `MAX_PNG_BYTES` bytes. Last, `nbdev_clean`
runs on the notebook, so the committed file is exactly what `nbdev_clean` would leave.

A notebook is replaced only when every cell ran: one that raises is left as it was, and the script
goes on with the others and exits non-zero naming the notebook and the cell.

    python tools/execute_notebooks.py [NB ...]      # default: every nbs/*.ipynb (not nbs/pipeline/)
"""
import argparse
import base64
import configparser
import html
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
KERNEL = "movierec"
MAX_PNG_BYTES = 100_000   # one figure in a committed notebook, base64-decoded
MAX_PNG_WIDTH = 800       # pixels: about dpi 80 for matplotlib's default 6.4-inch-wide figure (wider ones shrink)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
KERNEL_ENV = {
    "MOVIEREC_PROGRESS": "log",     # core.progress: log lines (stderr, dropped) instead of tqdm widgets
    "TQDM_DISABLE": "1",            # any other tqdm bar (transformers, peft, datasets) stays silent
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures shown as image/png, whatever the caller's shell set
    "PYTHONHASHSEED": "0",          # set and dict orders that depend on str hashes are the same every run
}
# IPython shows a bare `matplotlib.figure.Figure` (what the library's plot functions return) as image/png only
# once the inline backend is active; 80 dpi keeps a default 6.4-inch figure about 510 pixels wide. The kernel's
# own log (not the cells' output) says only errors: a local kernel over TCP warns about encryption each start.
KERNEL_ARGS = ["--matplotlib=inline", "--InteractiveShellApp.exec_lines=import matplotlib; matplotlib.rcParams['figure.dpi'] = 80",
               "--IPKernelApp.log_level=ERROR"]


def _redactions() -> list[tuple[re.Pattern, str]]:
    "Absolute paths of this machine and what replaces them, most specific first."
    start, end = r"(?<![\w.~/-])(?<!<project>)(?<!&lt;project&gt;)", r"(?=[/\s'\"),:;<\]]|$)"  # a whole path, not the tail of a relative one
    subs = [(re.escape(str(ROOT)), "<project>")]
    if str(Path.home()) not in ("/", ""): subs.append((re.escape(str(Path.home())), "~"))
    # a temporary folder's random name carries no information: keep what lies below it
    tmp = {re.escape(tempfile.gettempdir().rstrip("/") or "/tmp"), "/tmp", "/var/tmp"}
    subs += [(rf"(?:/private)?(?:{'|'.join(sorted(tmp))})/[^/\s'\"),:;<\]]+", "<tmp>"),
             (r"/(?:work|root|home)/[^/\s'\"),:;<\]]+", "<path>")]
    return [(re.compile(start + p + end), r) for p, r in subs]


REDACTIONS = _redactions()


def redact(text: str, is_html: bool = False) -> str:
    "`text` with the absolute paths of this machine replaced by `<project>`, `~`, `<tmp>` or `<path>` (escaped in HTML)."
    for pat, rep in REDACTIONS: text = pat.sub(html.escape(rep) if is_html else rep, text)
    return text


def _collapse_cr(text: str) -> str:
    "What a terminal shows of `text`: each line's last carriage-return segment (progress-bar debris goes)."
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n"))


def shrink_png(b64: str, max_bytes: int = MAX_PNG_BYTES, max_width: int = MAX_PNG_WIDTH) -> str:
    "A base64 PNG at most `max_width` pixels wide and `max_bytes` bytes (palette-quantized, then scaled down as needed); unchanged if it already fits."
    raw = base64.b64decode(b64)
    from PIL import Image  # pillow comes with matplotlib
    img = Image.open(io.BytesIO(raw))
    if len(raw) <= max_bytes and img.width <= max_width: return b64
    img = img.convert("RGBA") if "A" in img.getbands() or "transparency" in img.info else img.convert("RGB")
    scale = min(1.0, max_width / img.width)
    while True:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        small = img.resize(size, Image.LANCZOS) if size != img.size else img
        small = small.quantize(256, method=Image.Quantize.FASTOCTREE)  # plots have few colours: a palette keeps them
        buf = io.BytesIO()
        small.save(buf, "PNG", optimize=True)
        if buf.tell() <= max_bytes or min(size) <= 16: return base64.b64encode(buf.getvalue()).decode()
        scale *= 0.8


def _tidy_data(data: dict, metadata: dict) -> None:
    for mime in list(data):
        value = data[mime]
        if mime == "image/png":
            small = shrink_png(value if isinstance(value, str) else "".join(value))
            if small != value:
                data[mime] = small
                metadata.pop(mime, None)  # width/height hints of the original size
        elif mime.startswith("text/") or mime in ("application/json", "application/javascript"):
            if isinstance(value, list): value = "".join(value)
            if isinstance(value, str): data[mime] = redact(value, is_html=mime == "text/html")


def tidy_outputs(nb) -> "nbformat.NotebookNode":
    "Tidy `nb`'s outputs in place for committing: no stderr, no widgets, no path of this machine, no big PNG."
    nb.metadata.pop("widgets", None)  # the widget state that went with the views dropped below
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                if out.name == "stderr": continue
                text = redact(_collapse_cr(out.text if isinstance(out.text, str) else "".join(out.text)))
                if kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
                    kept[-1].text += text  # one stdout block per cell, as a terminal would show it
                    continue
                out.text = text
            elif out.output_type in ("display_data", "execute_result"):
                data = out.get("data", {})
                if WIDGET_MIME in data: continue  # a widget's text fallback ("HBox(...)") says nothing either
                _tidy_data(data, out.setdefault("metadata", {}))
            elif out.output_type == "error":
                out.evalue = redact(out.evalue)
                out.traceback = [redact(t) for t in out.traceback]
            kept.append(out)
        cell.outputs = [o for o in kept if not (o.output_type == "stream" and not o.text)]
    return nb


def _test_flags() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return set(cfg.get("DEFAULT", "tst_flags", fallback="").replace("|", " ").split())


def _skipped(cell, flags: set[str]) -> bool:
    "Whether `nbdev_test` skips `cell`: not code, an `nbdev_export()` call, `#| eval: false` or a test flag."
    from nbdev.process import extract_directives
    if cell.cell_type != "code": return True
    if "nbdev_export" + "(" in cell.source: return True
    direc = extract_directives(nbformat.from_dict(dict(cell)), remove=False) or {}
    if direc.get("eval:", [""])[0].lower() == "false": return True
    return bool(flags & direc.keys())


class NotebookFailed(Exception): pass


def _shown(path: Path) -> str: return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def execute(path: Path, timeout: int = 1800) -> "nbformat.NotebookNode":
    "`path` executed on the movierec kernel in its folder (a new notebook object); `NotebookFailed` names the cell that raised."
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    nb = nbformat.read(path, as_version=4)
    flags = _test_flags()
    os.environ.update(KERNEL_ENV)  # the kernel inherits this process's environment
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False, extra_arguments=KERNEL_ARGS,
                            resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code": cell.outputs, cell.execution_count = [], None
            if _skipped(cell, flags): continue
            try: client.execute_cell(cell, i)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
                first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith("#|")), "")
                why = f"{e.ename}: {e.evalue}" if isinstance(e, CellExecutionError) else f"{type(e).__name__}: {e}"
                raise NotebookFailed(f"{_shown(path)}: cell {i} ({first.strip()[:70]!r}) raised {why}") from None
    return nb


def refresh(path: Path, timeout: int = 1800) -> None:
    "Execute `path`, tidy its outputs, `nbdev_clean` it and replace the notebook atomically."
    nb = tidy_outputs(execute(path, timeout))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".ipynb", dir=path.parent)
    os.close(fd)
    try:
        nbformat.write(nb, tmp)
        subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", tmp], cwd=ROOT, check=True,
                       capture_output=True)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to execute (default: every nbs/*.ipynb)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted(NBS.glob("*.ipynb"))
    failed = []
    for path in paths:
        t0 = time.monotonic()
        try: refresh(path, args.timeout)
        except NotebookFailed as e:
            failed.append(str(e))
            print(f"FAILED {e} (left unchanged)", flush=True)
            continue
        print(f"{_shown(path)}: executed in {time.monotonic() - t0:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
