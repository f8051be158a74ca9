"""shapes: a procedural text-to-image domain (domain.py), its small teacher (teacher.py) and the evaluator that
reads its samples (evaluator.py, our stand-in for the paper's DINO/CLIP features). The flow runs directly in
pixel space."""

from __future__ import annotations

from models.families import SHIPPED_WEIGHTS, Family, TeacherTrainer
from models.families.shapes import domain, evaluator, teacher

FAMILY = Family(
    name=teacher.NAME, load_teacher=teacher.load_teacher, save_teacher=teacher.save_teacher,
    evaluate_samples=evaluator.evaluate_samples, render=domain.render,
    # The sweep's objectives. Diversity is the ground-truth attribute spread among samples that show the prompted
    # shape and colour: failed samples (blank or faint tiles) add feature "diversity" but no attribute spread.
    diversity=("attribute_spread", 1), quality=("adherence", 1),
    # The fidelity table: the headline diversity, the feature diversity (the paper's DINO/CLIP diversity with our
    # evaluator's features), adherence, FD; a gap-recovered column for each diversity.
    fidelity_columns=("attribute_spread", "feature_diversity", "adherence", "frechet_distance"),
    gap_metrics=("attribute_spread", "feature_diversity"),
    prompts=tuple(domain.prompts()), trainer=TeacherTrainer(teacher.new_teacher, domain.training_batch),
    shipped_teacher=SHIPPED_WEIGHTS / "shapes-teacher")  # trained with orchestrator/recipes/shapes.yaml
