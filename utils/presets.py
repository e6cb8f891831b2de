"""The paper's commands as presets (--preset exp1|exp2|exp3; launch_run.sh --experiment N).

Each value comes from the original repository (mdausort/Cytology-fine-tuning): the README's command for
that experiment, except experiment 3's backbone, which its README leaves to the default and its ``run.py``
sets to ViT-L/14 for ``percentage_lora``. The README's placeholders ({dataset}, {seed}, {shots}, {lr},
{model_name}, {num_classes}, {level}) are the user's to give; ``--level`` is accepted (and ignored, with a
warning) on datasets without levels, as the README passes it for every dataset. Flags given on the
command line override a preset. Where the tool's own defaults differ (they are CLIP-LoRA's: lr 2e-4,
n_iters 500), only a preset gives the paper's runs.
"""

def medpeft_rank(values: dict) -> int:
    """The rank of the multi-label PEFT study: 4 at <= 1% of the labels, 8 at <= 10%, 32 above."""
    pct = values.get("percentage") if values.get("shots") == 0 else None
    pct = 100.0 if pct is None else float(pct)
    return 4 if pct <= 1 else 8 if pct <= 10 else 32


# A value may be a function of the other resolved values (given flags first).
PRESETS: dict[str, dict] = {
    # README, experiment 1: python3 main.py --root_path ./data/ --dataset {dataset} --seed {seed} --shots -1
    #     --lr {lr} --n_iters 50 --model_name {model_name} --num_classes {num_classes} --level {level} --textual False
    "exp1": {"method": "linear", "shots": -1, "n_iters": 50, "textual": False},
    # README, experiment 2: python3 main_lora.py --root_path ./data/ --dataset {dataset} --seed {seed}
    #     --shots {shots} --lr {lr} --n_iters 50 --position "all" --encoder "vision" --params "q v" --r 2
    #     --model_name {model_name} --num_classes {num_classes} --level {level}
    "exp2": {"method": "lora", "n_iters": 50, "params": ("q", "v"), "r": 2, "position": "all",
             "encoder": "vision"},
    # README, experiment 3: python3 main_lora.py --root_path ./data/ --dataset hicervix --seed {seed} --shots 0
    #     --lr 1e-3 --n_iters 100 --position "all" --encoder "vision" --pourcentage {pourcentage}
    #     --params "q k v o" --r 16 --model_name clip --level level_3
    # run.py: backbone = "ViT-L/14" when task == "percentage_lora" (the README's command gives no --backbone)
    "exp3": {"method": "lora", "dataset": "hicervix", "shots": 0, "lr": 1e-3, "n_iters": 100,
             "params": ("q", "k", "v", "o"), "r": 16, "position": "all", "encoder": "vision", "model_name": "clip",
             "backbone": "ViT-L/14",
             "level": "level_3"},
    # parameter-efficient fine-tuning of medical foundation models on multi-label data
    "medpeft": {"method": "lora", "params": ("q", "v"), "alpha": 32.0, "dropout_rate": 0.1, "r": medpeft_rank},
}
