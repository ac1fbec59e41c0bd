"""mkdocs hooks: pages and images that live outside docs/ in the source tree.

ARCHITECTURE.md and DESIGN.md stay at the top of the repository, where a reader of the source
finds them; the site shows them as architecture.md and design.md (their links to each other
renamed to match). The benchmark charts stay beside the results they draw, in bench/results/.
"""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"architecture.md": "ARCHITECTURE.md", "design.md": "DESIGN.md"}
IMAGES = {"assets/peers.png": "bench/results/peers.png", "assets/adaptive.png": "bench/results/adaptive.png"}


def on_files(files, config):
    for page, source in PAGES.items():
        text = (ROOT / source).read_text()
        for other_page, other_source in PAGES.items():
            text = text.replace(f"]({other_source})", f"]({other_page})")
        files.append(File.generated(config, page, content=text))
    for image, source in IMAGES.items():
        files.append(File.generated(config, image, abs_src_path=str(ROOT / source)))
    return files
