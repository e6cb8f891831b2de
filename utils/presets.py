"""The paper's README commands as presets (--preset exp1|exp2|exp3; launch_run.sh --experiment N).

Each preset is exactly the flags of the original repository's README command for that
experiment (mdausort/Cytology-fine-tuning); flags given on the command line override it.
Where the tool's own defaults differ (they are CLIP-LoRA's: lr 2e-4, n_iters 500), only a
preset gives the paper's runs.
"""

def medpeft_rank(values: dict) -> int:
    """The rank of the multi-label PEFT study: 4 at <= 1% of the labels, 8 at <= 10%, 32 above."""
    pct = values.get("percentage") if values.get("shots") == 0 else None
    pct = 100.0 if pct is None else float(pct)
    return 4 if pct <= 1 else 8 if pct <= 10 else 32


# A value may be a function of the other resolved values (given flags first).
PRESETS: dict[str, dict] = {
    # python3 main.py ... --shots -1 --n_iters 50 --textual False
    "exp1": {"method": "linear", "shots": -1, "n_iters": 50, "textual": False},
    # python3 main_lora.py ... --n_iters 50 --params "q v" --r 2 --position all --encoder vision
    "exp2": {"method": "lora", "n_iters": 50, "params": ("q", "v"), "r": 2, "position": "all",
             "encoder": "vision"},
    # python3 main_lora.py ... --shots 0 --lr 1e-3 --n_iters 100 --params "q k v o" --r 16
    #     --model_name clip --backbone ViT-L/14 --level level_3
    "exp3": {"method": "lora", "shots": 0, "lr": 1e-3, "n_iters": 100, "params": ("q", "k", "v", "o"), "r": 16,
             "model_name": "clip", "backbone": "ViT-L/14", "level": "level_3"},
    # parameter-efficient fine-tuning of medical foundation models on multi-label data
    "medpeft": {"method": "lora", "params": ("q", "v"), "alpha": 32.0, "dropout_rate": 0.1, "r": medpeft_rank},
}
