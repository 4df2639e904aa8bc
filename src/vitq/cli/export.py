"""``vitq export``: a saved quantized state as an ONNX graph with QuantizeLinear/DequantizeLinear (QDQ) pairs,
optionally run on labelled images in onnxruntime or OpenVINO and compared with vitq's own model."""

from __future__ import annotations

import argparse
import os

from vitq.errors import VitqError

DESCRIPTION = (
    "Each uniform quantizer becomes a QDQ pair with its own scale and zero point (per-channel weights with their "
    "axis, 8-bit codes as int8/uint8; narrower activations clip to their code range first). Weights are stored as "
    "their integer codes feeding a DequantizeLinear (INT4/UINT4 at opset >= 21 for weights of 4 bits or fewer, "
    "otherwise int8/uint8 codes restricted to the narrower range), so the file is small. PTF quantizers (FQ-ViT's "
    "LayerNorm inputs) are uniform per channel with one zero point, so they are QDQ pairs too (a per-tensor pair "
    "with scale 1 between a division and a multiplication by the channel scales). Every other kind (log2, twin, "
    "MPQ, ...) is exported as the float operations of its own fake_quant, which compute exactly the same values; "
    "the command lists them.")


def add_command(subparsers) -> None:
    from vitq.export.forms import DEFAULT_OPSET, MIN_OPSET
    from vitq.export.nbits import BLOCK_SIZE, COMPUTE
    from vitq.export.runtimes import RUNTIMES
    from vitq.targets import TARGETS

    p = subparsers.add_parser("export", help="write a saved quantized state as an ONNX QDQ model",
                              description=DESCRIPTION)
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", default=None, help="local weights file (.safetensors or .pth) with timm key names")
    p.add_argument("--state", required=True, help="folder written by vitq quantize --out (no calibration is run)")
    p.add_argument("--out", required=True, help="file to write: NAME.onnx (--format onnx) or NAME.xml (--format "
                                                "openvino, NAME.bin beside it); NAME.preprocess.json beside it")
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                   help="onnx: ONNX QDQ (default); openvino: OpenVINO IR (.xml/.bin) converted by OpenVINO from it")
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="the deployment target the state was quantized for (vitq quantize --target): checked "
                        "against the state, and the kernels its runtime runs for the file are listed")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}: INT4 weights; below 21 they are int8 codes; per-channel "
                        f"quantizers need {MIN_OPSET}+)")
    p.add_argument("--no-int4", action="store_true", help="store weights of <= 4 bits as int8 codes even at opset 21")
    p.add_argument("--matmulnbits", choices=("off", *COMPUTE), default=None,
                   help="linear weights of <= 4 bits as onnxruntime's MatMulNBits node (4-bit blocks; the file then "
                        "runs in onnxruntime only), computing with float inputs (float: the values of vitq's model) "
                        f"or inputs quantized to int8 per block of {BLOCK_SIZE} at run time (int8); "
                        "default: float under --target onnxruntime, else off (DequantizeLinear -> MatMul)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--check", action="store_true", help="run the exported file on --val and compare")
    p.add_argument("--val", default=None, help="labelled image folder for --check")
    p.add_argument("--num-val", type=int, default=None, help="seeded choice of N --val images (default all)")
    p.add_argument("--labels", choices=("wnid", "folder"), default="wnid")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="runtime for --check (default: the target's, else onnxruntime; --format openvino: openvino)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitq.export.onnx import export
    from vitq.export.runtimes import check, require
    from vitq.models.loading import create_model, sha256_file
    from vitq.state import load, read_config

    if args.check and args.val is None:
        raise VitqError("--check needs --val DIR (labelled images to run the exported model on)")
    if args.val is not None and not args.check:
        raise VitqError("--val is only used with --check (add --check, or drop --val)")
    from vitq.targets import get_target

    target = get_target(args.target) if args.target else None
    if args.runtime is None:
        args.runtime = "openvino" if args.format == "openvino" else (
            target.runtime if target is not None and target.runtime in ("onnxruntime", "openvino") else "onnxruntime")
    if args.format == "openvino" and args.runtime != "openvino":
        raise VitqError(f"--format openvino writes OpenVINO IR, which {args.runtime} cannot run (use --runtime "
                        "openvino, or --format onnx to check in onnxruntime)")
    if args.matmulnbits is None:
        args.matmulnbits = "float" if target is not None and target.runtime == "onnxruntime" else "off"
    if args.matmulnbits != "off" and (args.format != "onnx" or args.runtime != "onnxruntime"):
        raise VitqError(f"--matmulnbits {args.matmulnbits} writes an onnxruntime-only node, which --format "
                        f"{args.format} / --runtime {args.runtime} cannot take (use --matmulnbits off)")
    if target is not None and args.format not in target.formats:
        raise VitqError(f"--target {target.name} does not take --format {args.format} (it takes "
                        f"{', '.join(target.formats)})")
    require("onnx")
    if args.format == "openvino":
        require("openvino")
    if args.check:
        require(args.runtime)
    cfg = read_config(args.state)
    if cfg.get("model") not in (None, args.model):
        raise VitqError(f"state {args.state} was made for model {cfg['model']}, not {args.model}")
    made_for = (cfg.get("scheme") or {}).get("target") or "none"
    if target is not None and made_for != target.name:
        raise VitqError(f"state {args.state} was quantized for --target {made_for}, not {target.name} (quantize "
                        f"again with --target {target.name}, or export without --target)")
    model = create_model(args.model, weights=args.weights, pretrained=args.weights is None,
                         **(cfg.get("model_args") or {}))
    qmodel = load(model, args.state)
    meta = {"model": args.model, "weights_sha256": sha256_file(args.weights) if args.weights else None,
            "state": os.path.abspath(args.state), "scheme": cfg.get("scheme"), "method": cfg.get("method"),
            "refine": cfg.get("refine")}
    kw = dict(opset=args.opset, int4=not args.no_int4, overwrite=args.overwrite, float_model=model, metadata=meta)
    if args.format == "openvino":
        from vitq.export.openvino_ir import export_openvino

        info = export_openvino(qmodel, args.out, **kw)
    else:
        info = export(qmodel, args.out, nbits=None if args.matmulnbits == "off" else args.matmulnbits, **kw)
    n_q, n_f = len(info["quantizers_qdq"]), len(info["quantizers_float"])
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.2f} MB, opset {info['opset']}) and "
          f"{os.path.basename(info['preprocess_json'])}")
    print(f"{n_q} quantizers as QuantizeLinear/DequantizeLinear; weights: {info['weight_storage']}")
    if n_f:
        kinds = ", ".join(info["float_kinds"])
        print(f"{n_f} quantizers ({kinds}) have no QDQ form and were exported as the float operations of their "
              f"fake quantization: {', '.join(info['quantizers_float'])}")
    if info["modules_own_forward"]:
        print(f"{len(info['modules_own_forward'])} layers keep their own forward (exact, with fewer integer kernels): "
              f"{', '.join(info['modules_own_forward'])}")
    if info["quantizers_identity"]:
        print(f"{len(info['quantizers_identity'])} quantizers left in float (by the target, or never calibrated) "
              "were left out")
    if target is not None and target.runtime in ("onnxruntime", "openvino"):
        from vitq.export.kernels import describe, kernels

        print(f"kernels {target.runtime} runs: {describe(kernels(info['path'], target.runtime))}")
    if args.check:
        from vitq.data import make_loader, model_transform, scan_image_folder, select_records

        transform, _ = model_transform(model)
        records = select_records(scan_image_folder(args.val, labels=args.labels), args.num_val, args.seed)
        loader = make_loader(records, transform, batch_size=args.batch_size)
        res = check(info["path"], qmodel, model, loader, args.runtime, progress=not args.quiet)
        print(f"{args.runtime} on {res['num_images']} images: top-1 {res['top1']:.2f} (vitq fake-quant "
              f"{res['fake_quant_top1']:.2f}), agreement with float {res['agreement_float']:.2f} %, with vitq's "
              f"fake-quantized model {res['agreement_fake_quant']:.2f} %, max |logit diff| "
              f"{res['max_abs_logit_diff']:.4f}")
    return 0
