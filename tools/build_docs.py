"""Build the documentation site: every notebook of nbs/ and nbs/pipeline/ as an HTML page.

`make docs` runs it. It renders the notebooks as they are committed, outputs included, and
executes nothing; the pages need no network (no scripts, CSS in assets/, images embedded as
data: URIs). The landing page is nbs/index.ipynb followed by the notebooks in stage order with
their one-sentence summaries. Code that distracts is folded: cells that start with imports, and
every input of the pipeline notebooks (their outputs are the point). nbdev directives
(`#| export`) are taken out of the code and shown as small labels; `#| hide` cells are left out.

    python tools/build_docs.py [--nbs nbs] [--out _docs]
"""
import argparse
import ast
import html
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "docs" / "templates"
MARKER = ".movierec-docs"  # marks a folder this script wrote, so that a rebuild may replace it
SITE_TITLE = "movierec"  # where nbs/ has no index.ipynb to take the title from
SECTIONS = [("The run, stage by stage", "pipeline"), ("The library, module by module", "library")]
DIRECTIVE = re.compile(r"^#\|\s*(.*?)\s*$")


@dataclass
class Page:
    src: Path      # the notebook
    rel: str       # the page's path in the site, e.g. "pipeline/02_train.html"
    title: str     # the notebook's `# heading`
    summary: str   # its one-sentence summary (markdown)
    section: str   # "pipeline" or "library"; "" for the landing page


def title_and_summary(nb) -> tuple[str, str]:
    "The `# title` and the `> summary` line of the first markdown cell (else its first sentence after the title)."
    md = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    title = re.search(r"^#\s+(.+?)\s*$", md, re.M)
    summary = re.search(r"^>\s*(.+?)\s*$", md, re.M)
    if summary: return (title[1] if title else ""), summary[1]
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", md) if p.strip() and not p.lstrip().startswith("#")]
    first = re.match(r"(.+?[.!?])(\s|$)", paras[0]) if paras else None
    return (title[1] if title else ""), (first[1] if first else "")


def read_notebook(path: Path):
    "A notebook as committed; a bare title page where the folder has no index.ipynb."
    if path.exists() or path.name != "index.ipynb": return nbformat.read(path, as_version=4)
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {SITE_TITLE}")])


def notebook_pages(nbs: Path) -> list[Page]:
    "The site's pages in reading order: the landing page, the pipeline's stages, then the library's modules."
    found = [(nbs / "index.ipynb", "")]
    found += [(p, "pipeline") for p in sorted((nbs / "pipeline").glob("*.ipynb"))]
    found += [(p, "library") for p in sorted(nbs.glob("*.ipynb")) if p.name != "index.ipynb"]
    pages = []
    for src, section in found:
        title, summary = title_and_summary(read_notebook(src))
        rel = src.relative_to(nbs).with_suffix(".html").as_posix()
        pages.append(Page(src, rel, title or src.stem, summary, section))
    return pages


def leading_imports(source: str) -> int:
    "How many lines at the top of a cell are its import statements (0 where it does not start with one)."
    try: body = ast.parse(source).body
    except SyntaxError: return 0  # IPython magics and the like: leave the cell whole
    end = 0
    for stmt in body:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)): break
        end = stmt.end_lineno
    return end


def fold_summary(source: str) -> str:
    "What a folded cell says it holds: its first line of code past the imports and comments."
    skip = leading_imports(source)
    code = [l for l in source.splitlines()[skip:] if l.strip() and not l.lstrip().startswith("#")]
    return f"code: {code[0].strip()}" if code else "imports"


def prepare_cells(nb, fold_all: bool):
    "Drop front matter and `#| hide` cells, move nbdev directives out of the code, mark the code to fold."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "raw" and cell.source.lstrip().startswith("---"): continue  # papermill's skip_exec front matter
        if cell.cell_type != "code":
            cells.append(cell)
            continue
        lines = cell.source.splitlines()
        directives = []
        while lines and DIRECTIVE.match(lines[0]): directives.append(DIRECTIVE.match(lines.pop(0))[1])
        if "hide" in directives: continue
        cell.source = "\n".join(lines).strip("\n")
        cell.metadata["docs_directives"] = directives
        if "echo: false" in directives: cell.metadata.setdefault("transient", {})["remove_source"] = True
        code = cell.source.splitlines()
        n = 0 if fold_all else leading_imports(cell.source)
        if n and "\n".join(code[n:]).strip():
            # imports, then code that matters: fold the imports alone, show the rest with its outputs
            imports = nbformat.v4.new_code_cell("\n".join(code[:n]))
            imports.metadata.update(docs_directives=directives, docs_fold="imports")
            cells.append(imports)
            cell.source = "\n".join(code[n:]).strip("\n")
            cell.metadata["docs_directives"] = []  # shown once, above the imports
        elif n: cell.metadata["docs_fold"] = "imports"
        elif fold_all and cell.source: cell.metadata["docs_fold"] = fold_summary(cell.source)
        cells.append(cell)
    nb.cells = cells
    return nb


def href(page: Page, target: Page) -> str:
    "The link from one page to another, relative so that the site works from any folder or file://."
    return posixpath.relpath(target.rel, posixpath.dirname(page.rel) or ".")


def link_notebooks(body: str, page: Page, by_src: dict) -> str:
    "Point the notebooks a page names (`01_data.ipynb` in code or in a link) at their pages."
    def target(ref):
        other = by_src.get((page.src.parent / ref).resolve())
        return other and href(page, other)
    def code(m):
        if m[1] or not (url := target(m[2])): return m[0]  # already inside a link, or not a page of the site
        return f'<a href="{url}"><code>{m[2]}</code></a>'
    def link(m): return f'href="{target(m[1]) or m[1]}"'
    body = re.sub(r"(<a [^>]*>)?<code>([\w./-]+\.ipynb)</code>", code, body)
    return re.sub(r'href="([\w./-]+\.ipynb)"', link, body)


def inline_markdown(text: str) -> str:
    "A summary's markdown as HTML: escaped, with `code` spans."
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def lab_css(exporter) -> str:
    "JupyterLab's notebook CSS (light theme) from nbconvert's lab template, shared by every page."
    static = next(Path(p) / "static" for p in exporter.template_paths if (Path(p) / "static" / "index.css").exists())
    return "\n".join((static / n).read_text(encoding="utf-8") for n in ("index.css", "theme-light.css"))


def page_context(pages: list[Page], i: int) -> dict:
    "What the template needs besides the notebook (`resources.docs`): links home, back, on, and the landing page's list."
    page, site_title = pages[i], pages[0].title
    def nav(p): return p and {"href": href(page, p), "title": p.title}
    contents = [{"heading": heading, "pages": [{"href": href(page, p), "title": p.title, "summary_html": inline_markdown(p.summary)}
                                               for p in pages if p.section == key]}
                for heading, key in SECTIONS if any(p.section == key for p in pages)]
    return {"root": "../" * page.rel.count("/"), "site_title": site_title,
            "prev": nav(pages[i - 1] if i else None), "next": nav(pages[i + 1] if i + 1 < len(pages) else None),
            "sections": [] if page.section else contents}


def render_site(nbs: Path, out: Path) -> list[Page]:
    "Write every page (index.html first) and assets/ into `out` (an empty folder)."
    pages = notebook_pages(nbs)
    by_src = {p.src.resolve(): p for p in pages}
    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATES)], template_name="movierec", embed_images=True,
                            exclude_input_prompt=True, exclude_output_prompt=True, exclude_anchor_links=True)
    for i, page in enumerate(pages):
        nb = prepare_cells(read_notebook(page.src), fold_all=page.section == "pipeline")
        nb.metadata["title"] = f"{page.title} · {pages[0].title}" if i else page.title
        resources = {"metadata": {"name": page.title, "path": str(page.src.parent)}, "docs": page_context(pages, i)}
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        dest = out / page.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(link_notebooks(body, page, by_src), encoding="utf-8")
    (out / "assets").mkdir(exist_ok=True)
    (out / "assets" / "lab.css").write_text(lab_css(exporter), encoding="utf-8")
    shutil.copy(TEMPLATES / "movierec" / "static" / "docs.css", out / "assets" / "docs.css")
    return pages


def build_site(nbs: Path, out: Path) -> list[Page]:
    "Render the site into a fresh folder, then put it in place of `out` (only ever replacing a site this script wrote)."
    nbs, out = Path(nbs), Path(out)
    if not nbs.is_dir(): raise SystemExit(f"build_docs: no notebook folder {nbs}")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"build_docs: {out} holds files this script did not write; give another --out or empty it")
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pages = render_site(nbs, staging)
    (staging / MARKER).write_text("written by tools/build_docs.py; replaced by each build\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return pages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbs", type=Path, default=ROOT / "nbs", help="the notebook folder (default: nbs/)")
    ap.add_argument("--out", type=Path, default=ROOT / "_docs", help="the site's folder (default: _docs/)")
    args = ap.parse_args(argv)
    pages = build_site(args.nbs, args.out)
    print(f"wrote {len(pages)} pages to {args.out}/ (open {args.out / 'index.html'})")


if __name__ == "__main__":
    main()
