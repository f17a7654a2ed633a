"""``python -m sim``: write simulated visit bundles with ground truth.

Example::

    python -m sim --out /tmp/survey --visits 2 --detectors 4 --sources-per-detector 53 --seed 1

writes ``/tmp/survey/{visit}/visit.json`` (``{visit}`` the LSSTCam visit number
``day_obs·10⁵ + seq_num``, e.g. 2025112000001), per detector ``diaSources.parquet``,
``difference.fits``, ``science.fits``, ``template.fits``, ``truth.parquet`` and
``truth_objects.parquet``, and the survey catalogue ``/tmp/survey/truth/objects.parquet``.
``--out`` may be any fsspec URL (``s3://bucket/prefix``).

Each visit is written as an upstream system would deliver it
(docs/realtime.md): first its next-visit message ``{visit}/next-visit.json``
(predicted boresight off by ``--pointing-error``, 2″ RMS by default), then the
bundle, then the completion marker ``{visit}/complete.json``.
"""

from __future__ import annotations

import argparse
import sys
import time

from core.completion import mark_complete
from sim.config import LSSTCAM_DETECTOR_SIZE, SurveyConfig
from sim.nextvisit import DEFAULT_POINTING_ERROR_ARCSEC, next_visit_message, write_next_visit
from sim.survey import Survey


def _size(text: str) -> tuple[int, int]:
    if text.lower() == "lsstcam":
        return LSSTCAM_DETECTOR_SIZE
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"detector size must be PX, NXxNY or 'lsstcam', got {text!r}")


def announce(survey: Survey, root: str, visit: int, pointing_error_arcsec=None) -> str:
    """Write ``visit``'s next-visit message beside its bundle; returns the URL."""
    error = (
        DEFAULT_POINTING_ERROR_ARCSEC if pointing_error_arcsec is None else pointing_error_arcsec
    )
    return write_next_visit(root, next_visit_message(survey, visit, error))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="root directory or fsspec URL")
    p.add_argument("--visits", type=int, default=1, help="number of visits to write")
    p.add_argument(
        "--first-visit",
        type=int,
        default=0,
        help="index of the first visit to write (0: the survey's first)",
    )
    p.add_argument("--detectors", type=int, default=189, help="central detectors per visit")
    p.add_argument(
        "--sources-per-detector", type=float, default=53.0, help="≈ DiaSources per detector"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--detector-size", type=_size, default=(512, 512), help="PX, NXxNY or 'lsstcam'")
    p.add_argument("--survey-visits", type=int, default=None, help="survey length in visits")
    p.add_argument("--bogus-fraction", type=float, default=None)
    p.add_argument("--psf", choices=("gaussian", "moffat"), default=None)
    p.add_argument("--workers", type=int, default=2, help="threads per visit")
    p.add_argument("--no-truth-catalog", action="store_true", help="skip truth/objects.parquet")
    p.add_argument(
        "--pointing-error",
        metavar="ARCSEC",
        type=float,
        default=None,
        help="radial RMS of the predicted boresight's error in next-visit.json (default 2 arcsec)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line; bad values give one ``error:`` line and exit status 2."""
    from pydantic import ValidationError

    from core.errors import one_line

    try:
        return _main(argv)
    except (ValidationError, OSError) as exc:
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        print(f"python -m sim: error: {where}{text}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.visits < 1 or args.first_visit < 0:
        raise SystemExit("--visits must be >= 1 and --first-visit >= 0")
    if args.pointing_error is not None and not 0 <= args.pointing_error < 3600:
        raise SystemExit(f"--pointing-error must be in [0, 3600) arcsec, got {args.pointing_error}")
    extra = {}
    if args.survey_visits is not None:
        extra["n_visits"] = args.survey_visits
    else:
        extra["n_visits"] = max(120, args.first_visit + args.visits)
    if args.bogus_fraction is not None:
        extra["bogus_fraction"] = args.bogus_fraction
    if args.psf is not None:
        extra["psf_model"] = args.psf
    config = SurveyConfig(
        seed=args.seed,
        n_detectors=args.detectors,
        sources_per_detector=args.sources_per_detector,
        detector_size=args.detector_size,
        workers=args.workers,
        **extra,
    )
    survey = Survey(config)
    if not args.no_truth_catalog:
        print(f"wrote {survey.write_truth(args.out)} ({len(survey.sky)} true objects)")
    for visit in range(args.first_visit, args.first_visit + args.visits):
        t0 = time.perf_counter()
        announce(survey, args.out, visit, args.pointing_error)
        paths = survey.write_visit(args.out, visit, truth_catalog=False)
        mark_complete(args.out, survey.config.visit_number(visit))
        dt = time.perf_counter() - t0
        info = survey.visit_info(visit)
        print(
            f"visit {info.visit}: band {info.band}, {len(info.detectors)} detectors, "
            f"{len(paths)} files under {paths[0].rsplit('/', 1)[0]} in {dt:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
