"""PipelineConfig: one typed, validated configuration for a whole visit.

It composes the configs of every stage. Field names are snake_case; each
description names the Rubin ``DiaPipelineTask`` / ``PackageAlertsTask`` field
it corresponds to, so a Rubin user finds the switch they know. The flow takes a
``PipelineConfig`` as a typed parameter, so Prefect validates it and the UI
renders it as a form.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from alerts.cutouts import CutoutConfig
from alerts.kafka import KafkaConfig
from alerts.packet import PackagingConfig
from alerts.store import AlertStoreConfig
from apdb.config import ApdbConfig
from core.bundle import ReaderConfig
from core.ids import IdConfig
from tasks.associate import AssociationConfig
from tasks.calibrate import CalibrateConfig
from tasks.forced import ForcedConfig
from tasks.sourcefilters import SourceFilterConfig
from tasks.ssoassociate import SsoAssociationConfig
from tasks.summarise import SummaryConfig

__all__ = ["PRESETS", "AlertOutputConfig", "OrchestrationConfig", "PipelineConfig"]

#: Instrument presets: section → field → value, each value with its source.
#: A preset fills only what the configuration does not set itself.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Rubin's defaults: ap_association AssociationTask.maxDistArcSeconds = 1.0;
    # DiaPipelineTask.validBands ugrizy; PackageAlertsTask minCutoutSize 30 /
    # maxCutoutSize 102; obs_lsst RubinDimensionPacker (day_obs·10⁵ + seq_num, 40 bits,
    # 256 detectors).
    "lsstcam": {
        "association": {"max_distance_arcsec": 1.0},
        "summary": {"valid_bands": ("u", "g", "r", "i", "z", "y")},
        "cutouts": {"min_cutout_size": 30, "max_cutout_size": 102},
        "ids": {"visit_packing": "lsstcam", "ccd_exposure_id_bits": 40, "n_detectors": 256},
    },
    # ZTF: alerts join an object within 1.5 arcsec (Masci et al. 2019, PASP 131, 018003);
    # filters ZTF-g, -r, -i (Bellm et al. 2019, PASP 131, 018002); alert stamps are
    # 63 x 63 pixels (Patterson et al. 2019, PASP 131, 018001); 16 CCDs read out in
    # 4 quadrants, readout channels rcid 0-63, the unit ZTF processes; plain exposure ids
    # (expid < 2^31), packed linearly: 31 + 6 bits, 26 bits of rows.
    "ztf": {
        "association": {"max_distance_arcsec": 1.5},
        "summary": {"valid_bands": ("g", "r", "i")},
        "cutouts": {"min_cutout_size": 63, "max_cutout_size": 63},
        "ids": {"visit_packing": "linear", "ccd_exposure_id_bits": 37, "n_detectors": 64},
    },
    # DECam as processed by Rubin's pipelines (obs_decam + ap_pipe): ap_association's 1.0
    # arcsec gate and PackageAlertsTask's 30-102 px stamps; filters u g r i z Y
    # (Flaugher et al. 2015, AJ 150, 150); 62 science CCDs, ccdnum 1-62; plain exposure
    # numbers (expnum < 2^26), packed linearly: 26 + 6 bits, 31 bits of rows.
    "decam": {
        "association": {"max_distance_arcsec": 1.0},
        "summary": {"valid_bands": ("u", "g", "r", "i", "z", "y")},
        "cutouts": {"min_cutout_size": 30, "max_cutout_size": 102},
        "ids": {"visit_packing": "linear", "ccd_exposure_id_bits": 32, "n_detectors": 64},
    },
}

_PRESET_HELP = (
    "Instrument preset: fills the association gate, the bands, the ID layout and the stamp "
    "size wherever the configuration does not set them itself. "
    "'lsstcam' (default, Rubin's defaults): gate 1.0 arcsec (ap_association "
    "maxDistArcSeconds), bands ugrizy (validBands), stamps 30-102 px (PackageAlertsTask "
    "minCutoutSize/maxCutoutSize), IDs day_obs·1e5 + seq_num in 40 bits, 256 detectors "
    "(obs_lsst RubinDimensionPacker). "
    "'ztf': gate 1.5 arcsec (ZTF's own association radius, Masci et al. 2019, PASP 131, "
    "018003), bands g r i (Bellm et al. 2019, PASP 131, 018002), stamps 63 px (ZTF alert "
    "cutouts, Patterson et al. 2019, PASP 131, 018001), IDs linear, 64 readout quadrants "
    "(16 CCDs x 4), 37 bits. "
    "'decam': gate 1.0 arcsec and stamps 30-102 px (Rubin's pipelines on DECam, obs_decam), "
    "bands ugrizy (DECam u g r i z Y, Flaugher et al. 2015, AJ 150, 150), IDs linear, 64 "
    "detectors (ccdnum 1-62), 32 bits. Command line: python -m flows.visit --preset ztf; "
    "deployment: parameters.config.preset."
)


class AlertOutputConfig(BaseModel, frozen=True, extra="forbid"):
    """Where alerts go besides Kafka."""

    do_write_alerts: bool = Field(
        True,
        description="Write Avro container files {visit}_{detector}.avro. Rubin: doWriteAlerts.",
    )
    store: AlertStoreConfig = Field(
        default_factory=AlertStoreConfig,
        description="Alert file location (local path or s3:// URL; Rubin: alertWriteLocation) "
        "and container codec.",
    )
    do_produce_alerts: bool = Field(
        False,
        description="Send alerts to Kafka (servers, topic and credentials in `kafka`). "
        "Rubin: doProduceAlerts.",
    )
    do_write_failed_alerts: bool = Field(
        True,
        description="Alerts Kafka did not acknowledge go to the dead-letter store. "
        "Rubin: doWriteFailedAlerts.",
    )
    do_write_qa_sources: bool = Field(
        True,
        description="Write the detector's QA source tables beside its alert file: "
        "{visit}_{detector}.marginal.parquet (unassociated sources failing the new-object cut) "
        "and {visit}_{detector}.trailed.parquet (the long-trailed sources set aside before "
        "association). Rubin: the marginal and long-trailed DiaSource outputs of "
        "DiaPipelineTask.",
    )
    dead_letter_location: str = Field(
        "./dead-letters",
        description="Local path or s3:// URL of the dead-letter store "
        "(re-send with `python -m alerts replay`).",
    )


class OrchestrationConfig(BaseModel, frozen=True, extra="forbid"):
    """How the flow maps detectors onto Prefect tasks and workers."""

    detectors_per_task: int = Field(
        48,
        ge=1,
        description="Detectors handled by one task run of each stage. 1 gives one task run per "
        "detector and stage (most visible: 9 x 189 = 1,701 task runs a visit); 48 gives 4 groups "
        "x 9 stages = 36 task runs for LSSTCam's 189 detectors, one group per worker at a time "
        "on 2 workers (the setting of bench/RESULTS.md, 'visit' and 'night').",
    )
    bundle_cache_mb: int = Field(
        4096,
        ge=0,
        description="Memory (MiB) per process for detector bundles kept between stages (LRU). "
        "Each stage that needs pixels would otherwise read the bundle again; size it to hold "
        "the groups a process works on at once (LSSTCam: ~200 MB a detector; the simulator's "
        "512x512 px: ~12 MB). 0 keeps only the newest bundle.",
    )
    max_workers: int = Field(
        4, ge=1, description="Threads of the ThreadPoolTaskRunner (the default runner)."
    )
    task_runner: str = Field(
        "thread",
        pattern=r"^(thread|dask(=.+)?)$",
        description="'thread', 'dask' (a LocalCluster, one single-threaded worker process per "
        "core: both cores busy) or 'dask=tcp://host:port' (an existing Dask scheduler), via "
        "prefect-dask. Each detector group's stages run on one worker.",
    )
    retries: int = Field(
        3, ge=0, le=10, description="Retries of a stage task, on TransientError only."
    )
    retry_backoff_s: float = Field(
        1.0, ge=0, description="First retry delay (s); doubles on each further retry."
    )
    retry_jitter_factor: float = Field(
        0.5, ge=0, description="Random jitter added to each retry delay, as a fraction of it."
    )
    cache: bool = Field(
        True,
        description="Cache the results of the stages that depend only on files and settings "
        "(calibrate), per detector, so a re-run skips them. Stages that read the APDB are never "
        "cached; a failed detector is never cached (docs/caching.md).",
    )
    result_storage: str | None = Field(
        None,
        description="Where cached stage results are kept: a local path or s3:// URL "
        "(default: PREFECT_LOCAL_STORAGE_PATH/diapipe).",
    )
    preload_pad_arcsec: float = Field(
        20.0,
        ge=0,
        description="Pad (arcsec) of a detector's predicted footprint when preload_visit loads "
        "its DiaObjects and DiaSource history from a next-visit message. The real footprint, "
        "padded 2 arcsec, must lie inside it for the preload to be used, so the pad must cover "
        "the pointing error. Rubin's Prompt Processing pads its preload by 20 arcsec.",
    )
    preload_max_age_s: float = Field(
        300.0,
        ge=0,
        description="A preload older than this (seconds since it was loaded) when the visit's "
        "load stage looks for it is discarded and the load runs as without one. The load "
        "re-queries the APDB either way, so the age bounds the refresh work, not correctness.",
    )
    preload_cache_mb: int = Field(
        2048,
        ge=0,
        description="Budget (MiB) for preloaded detectors: DataFrame bytes (pandas "
        "memory_usage deep) per process in memory, or file bytes under preload_dir. Oldest "
        "preloads are dropped first; a detector larger than the whole budget is not kept; 0 "
        "keeps none (docs/realtime.md).",
    )
    wait_for_earlier_s: float = Field(
        300.0,
        ge=0,
        description="Before its first load, a visit waits at most this long (s) until every "
        "earlier, overlapping visit of its night under the same bundle root is stored, so "
        "visits processed at once store in the order they were taken (a detector loading "
        "after a later visit stored its region is refused). 0: no wait (flows/order.py).",
    )
    preload_dir: str | None = Field(
        None,
        description="Local directory where preload_visit keeps each detector's preload as "
        "files (Arrow IPC + JSON), so that a visit processed in another process on this "
        "machine finds it: a deployment run, a Dask worker. Bounded by preload_cache_mb; a "
        "preload is deleted when used. None keeps preloads in the memory of the process that "
        "ran preload_visit (docs/realtime.md).",
    )
    cache_expiration_hours: float = Field(
        48.0,
        gt=0,
        description="Age after which a cached result is not used; it is deleted when the next "
        "visit starts.",
    )


class PipelineConfig(BaseModel, frozen=True, extra="forbid"):
    """Everything a visit needs. Defaults are Rubin's defaults where Rubin has one."""

    preset: Literal["lsstcam", "ztf", "decam"] = Field("lsstcam", description=_PRESET_HELP)
    apdb: ApdbConfig = Field(default_factory=ApdbConfig, description="The APDB connection.")
    ids: IdConfig = Field(
        default_factory=IdConfig, description="64-bit ID packing (docs/design.md §3)."
    )
    reader: ReaderConfig = Field(
        default_factory=ReaderConfig, description="Input bundle validation."
    )
    calibrate: CalibrateConfig = Field(
        default_factory=CalibrateConfig, description="Pixel→sky and counts→nJy calibration."
    )
    source_filters: SourceFilterConfig = Field(
        default_factory=SourceFilterConfig,
        description="Rubin's production source filters: the reliability cut and the long-trail "
        "cut before association, and the good-DiaObject rule of forced photometry "
        "(docs/solar-system.md). Rubin: DiaPipelineTask minReliability, doTrailedSourceFilter, "
        "_selectGoodDiaObjects.",
    )
    solar_system: SsoAssociationConfig = Field(
        default_factory=SsoAssociationConfig,
        description="Association with known solar-system objects, before DiaObjects, from the "
        "visit's ephemeris table (docs/solar-system.md). Rubin: SolarSystemAssociationTask.",
    )
    association: AssociationConfig = Field(
        default_factory=AssociationConfig,
        description="DiaSource→DiaObject association. Rubin: AssociationTask.",
    )
    summary: SummaryConfig = Field(
        default_factory=SummaryConfig,
        description="DiaObject summary statistics. Rubin: DiaCalculationTask.",
    )
    forced: ForcedConfig = Field(
        default_factory=ForcedConfig,
        description="Forced photometry. Rubin: DiaForcedSourceTask, doRunForcedMeasurement.",
    )
    cutouts: CutoutConfig = Field(
        default_factory=CutoutConfig, description="Alert stamps. Rubin: PackageAlertsTask."
    )
    packaging: PackagingConfig = Field(
        default_factory=PackagingConfig,
        description="Alert packets. Rubin: doPackageAlerts, alertSchemaVersion.",
    )
    output: AlertOutputConfig = Field(
        default_factory=AlertOutputConfig, description="Alert files and dead letters."
    )
    kafka: KafkaConfig = Field(
        default_factory=KafkaConfig, description="Kafka producer. Rubin: doProduceAlerts."
    )
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Prefect task grouping and runners."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the preset's values into the sections and fields not given."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "lsstcam")
        if name not in PRESETS:
            return data  # the Literal field reports the bad name
        out = dict(data)
        for section, values in PRESETS[name].items():
            given = out.get(section)
            if isinstance(given, BaseModel):
                continue  # a section passed as a model is taken as it is
            out[section] = {**values, **(given or {})}
        return out

    def digest(self) -> str:
        """A short hash of every setting that changes results (for cache keys).

        Orchestration settings and secrets are left out: they change how a visit
        runs, not what it produces.
        """
        data = self.model_dump(mode="json", exclude={"orchestration"})
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
