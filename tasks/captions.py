"""Image-text pairs: retrieval between images and their captions, trained contrastively by the method."""

from __future__ import annotations

from common.errors import UserError
from evaluation.metrics import compute_metrics, retrieval_summary
from lora import lora_disabled
from tasks.registry import Evaluation, Task, probability_csv, register
from tasks.text import class_text_embeddings

PARTS = ("val", "test")


def evaluate(ctx, plan, predict, parts=PARTS, extras: bool = True) -> Evaluation:
    """Retrieval both ways between each part's images and its captions (recall@1/5/10, median rank) and,
    when the pairs have classes, zero-shot classification from the class prompts; the same with the
    adapters switched off (the model before fine-tuning) in ``before_finetuning``.

    predictions.csv: label is the index of the image's own caption within its part, pred the caption
    retrieved first.
    """
    metrics, rows = _retrieval(ctx, plan, predict, parts)
    if not extras:
        return Evaluation(metrics, rows, [])
    with lora_disabled(ctx.spec.model):
        before, _ = _retrieval(ctx, plan, predict, parts)
    return Evaluation(metrics, rows, [], {"before_finetuning": before})


def _retrieval(ctx, plan, predict, parts) -> tuple[dict, list]:
    metrics, rows = {}, []
    for part in parts:
        samples = ctx.split.items(part)
        if not samples:
            continue
        images, labels = predict(part, fn=plan.model.embed_images)
        texts = plan.model.embed_texts([ctx.split.captions[path] for path, _ in samples])
        similarity = (images @ texts.t()).numpy()
        metrics[part] = retrieval_summary(similarity)
        if ctx.split.classes and int(labels.min()) >= 0:
            prompts = class_text_embeddings(ctx)  # the dataset's class prompts, as zero-shot runs embed them
            zeroshot = compute_metrics((images @ prompts.t()).softmax(dim=1).numpy(), labels.numpy(),
                                       ctx.split.classes)
            metrics[part].update({f"zeroshot_{k}": zeroshot[k] for k in ("accuracy", "balanced_accuracy")})
        for i, ((path, _), first) in enumerate(zip(samples, similarity.argmax(axis=1).tolist(), strict=True)):
            rows.append((part, ctx.split.relative(path), i, first, []))
    return metrics, rows


def scorer(ctx, plan):
    """New images are classified through the class prompts (cosine similarity of the fine-tuned towers'
    embeddings, as the run's zero-shot accuracy is computed); pairs without classes cannot be."""
    if not ctx.split.classes:
        raise UserError("this image-text run's pairs have no classes, so new images cannot be classified: give the "
                        "csv a `label` column to predict through the class prompts")
    prompts = class_text_embeddings(ctx).to(ctx.device)
    return lambda x: plan.model.embed_images(x).float() @ prompts.t()


def predictions_csv(ctx, names, probs, record: dict) -> str:
    """`path,pred,p_<class>...`: the class whose prompt the image matches best, and the softmax of the cosine
    similarities to the class prompts."""
    classes = list(ctx.split.classes)
    preds = [classes[i] for i in probs.argmax(dim=1).tolist()] if len(names) else []
    return probability_csv(names, probs, classes, preds)


def export_info(record: dict) -> dict:
    raise UserError("an image-text run has no classifier head to export: its adapters are in the run folder "
                    "(lora.safetensors), and python -m utils.predict classifies new images through the class prompts")


TASK = register(Task(
    name="captions", description="image-text pairs (contrastive fine-tuning, retrieval metrics)",
    headline="recall@1", headline_name="recall@1 (mean of image-to-text and text-to-image)",
    summary=(("image_to_text_recall@1", "image-to-text R@1"), ("image_to_text_recall@5", "R@5"),
             ("text_to_image_recall@1", "text-to-image R@1"), ("text_to_image_recall@5", "R@5"),
             ("zeroshot_accuracy", "zero-shot accuracy")),
    report_metrics=("recall@1", *(f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
                    "zeroshot_accuracy"),
    evaluate=evaluate, activation="softmax", trains_head=False, contrastive=True,
    chance=lambda n: 1.0 / n if n else None, chance_counts="test pairs",
    scorer=scorer, predictions_csv=predictions_csv, export_info=export_info,
))
