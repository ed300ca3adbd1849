"""`saber operator` (run the kopf operator) and `saber crd` (generate or check the CRD YAML)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    op = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for SaberService resources",
        description="Reconcile SaberService resources into Deployments, Services and sidecar ConfigMaps. "
        "Settings also come from SABER_OPERATOR_* environment variables.",
    )
    op.add_argument("-n", "--namespace", action="append", default=None,
                    help="serve only this namespace (repeatable); default: every namespace. The operator then "
                    "needs a Role in each (manifests/overlays/namespaced) instead of a ClusterRole")
    op.add_argument("--peering", action="store_true", default=None,
                    help="one active replica at a time through kopf peering: the ClusterKopfPeering "
                    "`saber-operator` when serving every namespace, a KopfPeering of that name in each "
                    "namespace given with -n")
    op.add_argument("--liveness", default=None, metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--api-server", default=None, metavar="URL",
                    help="plain-HTTP API URL without credentials (for API emulators); default: in-cluster or kubeconfig")
    op.add_argument("--interval", type=float, default=None, metavar="S", help="drift and status timer, seconds")
    op.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    op.set_defaults(func=run_operator)

    crd = subparsers.add_parser("crd", help="generate or check the SaberService CRD YAML")
    sub = crd.add_subparsers(dest="crd_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write the CRD generated from the pydantic model")
    gen.add_argument("--out", default="-", help="file to write, or - for stdout (default)")
    gen.set_defaults(func=crd_generate)
    chk = sub.add_parser("check", help="exit 1 when the checked-in CRD differs from the model")
    chk.add_argument("--file", default=None, help="CRD file (default crds/saber.dev_saberservices.yaml)")
    chk.set_defaults(func=crd_check)


def run_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from saber_operator.handlers import run_operator as run
    from saber_operator.settings import OperatorSettings

    overrides = {
        "namespaces": args.namespace,
        "peering": args.peering,
        "liveness_endpoint": args.liveness,
        "api_server": args.api_server,
        "timer_interval_seconds": args.interval,
    }
    settings = OperatorSettings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every timer run at INFO; our own log says what changed
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    return 0


def crd_generate(args: argparse.Namespace) -> int:
    from saber_operator.crd import render_crd

    text = render_crd()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


def crd_check(args: argparse.Namespace) -> int:
    from saber_operator.crd import CRD_FILE, render_crd

    path = Path(args.file) if args.file else CRD_FILE
    try:
        current = path.read_text()
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if current != render_crd():
        print(f"{path} differs from the SaberService model; run: saber crd generate --out {path}", file=sys.stderr)
        return 1
    print(f"{path} matches the model")
    return 0
