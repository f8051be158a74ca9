"""The family registry: every name gives one typed Family that says what it has, and a Family that is both
embedded and pretrained (or neither) is refused."""

import dataclasses

import pytest

from models.families import NAMES, Family, TeacherTrainer, get_family


@pytest.mark.parametrize("name", NAMES)
def test_every_family_registers_one_typed_object(name):
    family = get_family(name)
    assert isinstance(family, Family) and family.name == name and get_family(name) is family
    assert (family.trainer is None) == (family.pipeline_class is not None)
    assert family.diversity[1] in (1, -1) and family.quality[1] in (1, -1)
    assert {family.diversity[0], family.quality[0]} <= set(family.fidelity_columns)
    assert family.diversity[0] == family.gap_metrics[0]
    if family.diversity[1] > 0:  # a collapse guard watches a higher-is-better diversity: the objective itself
        assert family.collapse == family.diversity[0]
    if family.trainer is not None:  # embedded families train here, from their own prompts
        assert family.prompts and family.shipped_teacher is not None


def test_a_family_is_embedded_or_pretrained_never_both():
    toy2d = get_family("toy2d")
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(toy2d, pipeline_class="StableDiffusion3Pipeline")
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(toy2d, trainer=None)
    assert isinstance(toy2d.trainer, TeacherTrainer)
    assert toy2d.collapse == "live_modes"  # mode_kl is lower-is-better


def test_unknown_names_list_the_families():
    with pytest.raises(KeyError, match="toy2d"):
        get_family("flux")
