"""Instrument presets of PipelineConfig: LSSTCam (default), ZTF, DECam."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.ids import IdPacker
from flows.config import PRESETS, PipelineConfig
from flows.visit import _parse


def test_default_is_lsstcam_with_rubins_numbers():
    c = PipelineConfig()
    assert c.preset == "lsstcam"
    assert c.association.max_distance_arcsec == 1.0
    assert c.summary.valid_bands == ("u", "g", "r", "i", "z", "y")
    assert (c.cutouts.min_cutout_size, c.cutouts.max_cutout_size) == (30, 102)
    assert c.ids.visit_packing == "lsstcam" and c.ids.ccd_exposure_id_bits == 40
    IdPacker(c.ids).pack(2026030500055, 188, [0])  # a real LSSTCam visit id


@pytest.mark.parametrize(
    ("preset", "gate", "bands", "stamp", "visit", "detector"),
    [
        ("ztf", 1.5, ("g", "r", "i"), (63, 63), 216_158_380, 63),
        ("decam", 1.0, ("u", "g", "r", "i", "z", "y"), (30, 102), 1_234_567, 62),
    ],
    ids=["ztf", "decam"],
)
def test_instrument_presets(preset, gate, bands, stamp, visit, detector):
    c = PipelineConfig(preset=preset)
    assert c.association.max_distance_arcsec == gate
    assert c.summary.valid_bands == bands
    assert (c.cutouts.min_cutout_size, c.cutouts.max_cutout_size) == stamp
    assert c.ids.visit_packing == "linear"
    packer = IdPacker(c.ids)
    ids = packer.pack(visit, detector, [0, 1_000_000])
    assert packer.unpack(ids)[0].tolist() == [visit, visit]
    assert c.digest() != PipelineConfig().digest()


def test_explicit_settings_win_over_the_preset():
    c = PipelineConfig.model_validate(
        {"preset": "ztf", "association": {"max_distance_arcsec": 2.0}, "cutouts": {}}
    )
    assert c.association.max_distance_arcsec == 2.0
    assert c.cutouts.min_cutout_size == 63  # a section given without the field: preset fills it
    assert c.summary.valid_bands == ("g", "r", "i")


def test_round_trip_and_deployment_parameters():
    """What a deployment's parameters.config (JSON) holds validates to the same config."""
    c = PipelineConfig(preset="ztf")
    assert PipelineConfig.model_validate(c.model_dump(mode="json")) == c
    assert PipelineConfig.model_validate({"preset": "decam"}) == PipelineConfig(preset="decam")


def test_unknown_preset_is_an_error():
    with pytest.raises(ValidationError, match="preset"):
        PipelineConfig(preset="hsc")


def test_every_preset_number_is_in_the_field_description():
    """Each number a preset sets is documented, with its source, in the preset field."""
    text = PipelineConfig.model_fields["preset"].description
    for name, sections in PRESETS.items():
        assert f"'{name}'" in text
        for values in sections.values():
            for v in values.values():
                if isinstance(v, float | int) and not isinstance(v, bool):
                    assert f"{v:g}" in text, (name, v)
    for source in ("Masci et al. 2019", "Patterson et al. 2019", "RubinDimensionPacker"):
        assert source in text


def test_cli_preset_flag():
    assert _parse(["--preset", "ztf"]).preset == "ztf"
    assert _parse([]).preset == "lsstcam"
    with pytest.raises(SystemExit):
        _parse(["--preset", "hsc"])
