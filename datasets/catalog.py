"""The toolkit's datasets, registered under the names ``--dataset`` accepts."""

from datasets import prepare, tabular
from datasets.hicervix import hicervix_tree, read_hicervix
from datasets.layouts import DEFAULT_HICERVIX_LEVEL, HICERVIX_LEVELS, PAPER_LAYOUTS, paper_layout_text
from datasets.readers import read_demo, read_demo_captions, read_folder, read_paper
from datasets.registry import CELL_PROMPT, CELLS_PROMPT, DatasetInfo, register

CLASS_FOLDERS = "<root>/{train,val,test}/<class>_<n>.<ext>"


def _build_it(name: str, src: str = "RAW") -> str:
    return f"build it with `python -m datasets prepare {name} --src {src} --dst ROOT`"


PAPER_DESCRIPTIONS = {
    "mlcc": "MLCC liquid-based cervical cytology, 4 classes (HSIL, LSIL, NL, SCC)",
    "bcfc": "BCFC body-cavity fluid cytology, 2 classes (malignant, benign)",
    "sipakmed": "SIPaKMeD single cervical cells, 5 classes",
}
for _name, _layout in PAPER_LAYOUTS.items():
    register(DatasetInfo(
        name=_name,
        description=PAPER_DESCRIPTIONS[_name],
        reader=read_paper,
        layout=paper_layout_text(_layout),
        prompt_template=CELL_PROMPT if _name == "sipakmed" else CELLS_PROMPT,
        prepare=prepare.paper_preparer(_name),
        how_to_prepare=_build_it(_name),
    ))

register(DatasetInfo(
    name="hicervix",
    description="HiCervix cervical cells with a three-level label hierarchy (--level)",
    reader=read_hicervix,
    hierarchy=hicervix_tree,
    layout="<root>/{train,val,test}/*.jpg with <root>/{train,val,test}.csv",
    levels=HICERVIX_LEVELS,
    default_level=DEFAULT_HICERVIX_LEVEL,
    prompt_template=CELL_PROMPT,
    prepare=prepare.run_check_hicervix,
    how_to_prepare="check a HiCervix download with `python -m datasets prepare hicervix --src ROOT`",
    protocols=("paper", "official"),
))
register(DatasetInfo(
    name="folder",
    generic=True,
    description="any single-label dataset stored as <root>/<split>/<class>_<n>.<ext>",
    reader=read_folder,
    layout=CLASS_FOLDERS,
    prepare=prepare.run_prepare_folder,
    how_to_prepare=_build_it("folder"),
))
register(DatasetInfo(
    name="csv",
    generic=True,
    description="<root>/{train,val,test}.csv: single-label, multi-label or image-text pairs",
    reader=tabular.read_csv_dataset,
    task=tabular.peek_task,
    layout="<root>/{train,val,test}.csv with a path column (relative to <root>) and label, caption or 0/1 columns",
    prepare=tabular.prepare_csv,
    how_to_prepare=_build_it("csv", "MANIFEST.csv"),
))
register(DatasetInfo(
    name="demo",
    synthetic=True,
    description="synthetic cells drawn on first use (software check only, not medical data)",
    reader=read_demo,
    layout=CLASS_FOLDERS,
    how_to_prepare="delete the folder so that the demo is generated again",
    needs_root=False,
))
register(DatasetInfo(
    name="demo_captions",
    synthetic=True,
    task="captions",
    description="synthetic cells with captions naming type, size, stain and position (image-text pairs; "
                "software check only, not medical data)",
    reader=read_demo_captions,
    layout="<cache>/demo_captions/{train,val,test}.csv with path, label and caption",
    prompt_template=CELL_PROMPT,
    how_to_prepare="delete the folder so that it is generated again",
    needs_root=False,
))
