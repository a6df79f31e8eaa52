#!/usr/bin/env bash
# Serve medcl bundles with MONAI Label (the "monaibundle" sample app), offline, from the MONAI Label venv.
#
#   scripts/start_monailabel.sh [--app DIR] [--studies DIR] [--bundle NAME[,NAME...]] [--model model.pt]
#                               [--dataset DIR] [--phantom N] [--set [NAME:]KEY=JSON ...] [--port PORT] [--no-start]
#
#   --app DIR        working copy of the sample app (default runs/monailabel/app); the configs in its model/<NAME>
#                    are rewritten on every start, the weights in model/<NAME>/models/ (trained in MONAI Label) kept
#   --studies DIR    MONAI Label studies folder: images at top level, labels in labels/final/ with the same file
#                    names (default runs/monailabel/studies)
#   --bundle NAMES   bundles/<NAME> to serve, comma separated (default scratch_baseline)
#   --model FILE     trained weights, copied to <app>/model/<first NAME>/models/model.pt (replacing the served
#                    model; FILE's .manifest.json goes with it); without a model.pt, /infer answers 404 until a
#                    /train writes one
#   --dataset DIR    MSD dataset whose dataset.json gives the bundle num_classes and modality (written as
#                    dataset_dir into the app's copy of the configs; default data/phantom of this repository)
#   --phantom N      first write an N-case 32³ phantom (medcl-phantom) to <studies>.phantom and lay it out as the
#                    studies folder: all N images, labels for the first N-1 (the last is left to annotate)
#   --set KEY=JSON   set KEY (a config id, '#' for nesting) in the app's copy of every config that has it, e.g.
#                    --set num_workers=0 --set 'patch_size=[32,32,32]'; NAME:KEY=JSON sets it in bundle NAME only,
#                    e.g. --set scratch_baseline:spatial_dims=3. MONAI Label itself only overrides bundle_root,
#                    device, train#trainer#max_epochs, train/validate#dataset#data, train#handlers (the app's train
#                    task adds max_epochs, val_interval, init and the self-training plan: docs/monai_label.md)
#   --port PORT      default 8000; the server listens on 127.0.0.1 only (MONAI_LABEL_HOST changes that)
#   --no-start       prepare the app and the studies, then exit without starting the server
#
# The bundle in bundles/ is never changed: the app gets a copy. The script ends by exec'ing the server, so its
# process id is the server's. Set up the venv first with scripts/setup_monailabel.sh.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${MEDCL_MONAILABEL_VENV:-$REPO/.venv-monailabel}"
APP="$REPO/runs/monailabel/app"; STUDIES="$REPO/runs/monailabel/studies"; BUNDLES="scratch_baseline"
MODEL=""; DATASET="$REPO/data/phantom"; PHANTOM=0; PORT=8000; SETS=(); START=1
while [ $# -gt 0 ]; do
    case "$1" in
        --app) APP="$2"; shift 2 ;;
        --studies) STUDIES="$2"; shift 2 ;;
        --bundle) BUNDLES="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --dataset) DATASET="$2"; shift 2 ;;
        --phantom) PHANTOM="$2"; shift 2 ;;
        --set) SETS+=("$2"); shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -x "$VENV/bin/monailabel" ] || { echo "no $VENV/bin/monailabel: run scripts/setup_monailabel.sh" >&2; exit 1; }
PY="$VENV/bin/python"

# 1. the sample app ships inside the monailabel wheel (<venv>/monailabel/sample-apps/monaibundle)
SAMPLE="$VENV/monailabel/sample-apps/monaibundle"
[ -d "$SAMPLE" ] || SAMPLE="$("$PY" -c 'import monailabel, os; print(os.path.join(os.path.dirname(monailabel.__file__), "sample-apps", "monaibundle"))')"
mkdir -p "$APP/model"
cp -r "$SAMPLE"/. "$APP"/
APP="$(cd "$APP" && pwd)"
# its main.py uses monailabel_site/medcl_monailabel.py's BundleInferTask and BundleTrainTask (see that file)
sed -i -e 's/^from monailabel.tasks.infer.bundle import BundleInferTask$/from medcl_monailabel import BundleInferTask/' \
    -e 's/^from monailabel.tasks.train.bundle import BundleTrainTask$/from medcl_monailabel import BundleTrainTask/' "$APP/main.py"
for task in BundleInferTask BundleTrainTask; do
    grep -q "^from medcl_monailabel import $task\$" "$APP/main.py" || { echo "unexpected $APP/main.py" >&2; exit 1; }
done

# 2. optional phantom studies: images at top level, labels under labels/final/ with the same names
if [ "$PHANTOM" -gt 0 ]; then
    DATASET="${STUDIES%/}.phantom"
    "$VENV/bin/medcl-phantom" --out "$DATASET" --n "$PHANTOM" --n_test 0 --seed 0 --shape 32,32,32 >/dev/null
    mkdir -p "$STUDIES/labels/final"
    cp "$DATASET"/imagesTr/*.nii.gz "$STUDIES"/
    for f in $(ls "$DATASET"/labelsTr/*.nii.gz | head -n $((PHANTOM - 1))); do cp "$f" "$STUDIES/labels/final/"; done
fi
[ -f "$DATASET/dataset.json" ] || { echo "no $DATASET/dataset.json: give --dataset DIR or --phantom N" >&2; exit 1; }
DATASET="$(cd "$DATASET" && pwd)"

# 3. a copy of each bundle in <app>/model/<NAME>, its configs pointed at DATASET plus any --set values
IFS=, read -r -a NAMES <<< "$BUNDLES"
for NAME in "${NAMES[@]}"; do
    DEST="$APP/model/$NAME"
    # everything but models/: the weights trained in MONAI Label survive a restart
    mkdir -p "$DEST/models"
    find "$DEST" -mindepth 1 -maxdepth 1 ! -name models -exec rm -rf {} +
    KEPT="$(cd "$DEST/models" && ls -- *.pt 2>/dev/null | tr '\n' ' ' || true)"
    [ -z "$KEPT" ] || echo "[start-monailabel] $NAME: keeping the weights in $DEST/models: $KEPT" >&2
    cp -r "$REPO/bundles/$NAME/configs" "$DEST"/
    for extra in docs LICENSE; do [ ! -e "$REPO/bundles/$NAME/$extra" ] || cp -r "$REPO/bundles/$NAME/$extra" "$DEST"/; done
    "$PY" - "$DEST/configs" "$NAME" "$BUNDLES" "dataset_dir=\"$DATASET\"" "${SETS[@]}" <<'EOF'
import glob, json, os, sys
files = [f for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))) if not f.endswith("metadata.json")]
configs = {f: json.load(open(f)) for f in files}
name, served = sys.argv[2], sys.argv[3].split(",")
for item in sys.argv[4:]:
    key, _, value = item.partition("=")
    target, sep, rest = key.partition(":")
    if sep:
        if target not in served:
            sys.exit(f"--set {item}: {target} is not one of the served bundles ({', '.join(served)})")
        if target != name:
            continue
        key = rest
    value, hit = json.loads(value), False
    for cfg in configs.values():
        if key in cfg:  # top-level ids may contain '#' themselves (e.g. evaluate.json's "validate#handlers")
            cfg[key], hit = value, True
            continue
        *parents, last = key.split("#")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last], hit = value, True
    if not hit:
        sys.exit(f"--set {item}: no such key in {', '.join(files)} (NAME:KEY=JSON sets a key of bundle NAME only)")
for f, cfg in configs.items():
    json.dump(cfg, open(f, "w"), indent=4)
EOF
done
if [ -n "$MODEL" ]; then
    cp "$MODEL" "$APP/model/${NAMES[0]}/models/model.pt"
    # the manifest travels with its weights; a stale one from the replaced model.pt would not match
    rm -f "$APP/model/${NAMES[0]}/models/model.pt.manifest.json"
    if [ -f "$MODEL.manifest.json" ]; then cp "$MODEL.manifest.json" "$APP/model/${NAMES[0]}/models/model.pt.manifest.json"; fi
fi
for NAME in "${NAMES[@]}"; do
    [ -e "$APP/model/$NAME/models/model.pt" ] || echo "[start-monailabel] $NAME has no models/model.pt yet: /infer answers 404 until a /train writes it" >&2
done
[ "$START" = 1 ] || { echo "[start-monailabel] prepared $APP (--no-start)" >&2; exit 0; }

# 4. the server (offline: the bundles exist locally, so zoo_source github downloads nothing; SAM2 off). The
# venv's bin/monailabel wrapper runs whichever `python` is first on PATH, so call the venv's python directly;
# monailabel_site/sitecustomize.py lets torchvision import beside the CPU torch (see that file).
export PYTHONPATH="$REPO/scripts/monailabel_site${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m monailabel.main start_server --app "$APP" --studies "$STUDIES" \
    --conf models "$BUNDLES" --conf zoo_source github --conf sam2 false \
    --host "${MONAI_LABEL_HOST:-127.0.0.1}" --port "$PORT"
