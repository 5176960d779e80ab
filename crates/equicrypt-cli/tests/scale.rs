//! Encryption at scale: `bench-encrypt --shape 1b` writes a Llama-3.2-1B-shaped BF16 transformers
//! checkpoint (2.5 GB, pseudo-random weights) and encrypts it in its own process. Asserts that it
//! succeeds and that peak memory stays far below the goal of twice the largest tensor: tensors are
//! streamed through an 8 MiB buffer, so it measures ≈ 0.07× here, and the bound of 0.5× fails as
//! soon as one tensor (≈ 1×) is held whole again. The time is printed, not asserted (`README`,
//! "Encryption at scale").

mod support;

#[test]
fn encrypting_a_1b_shaped_checkpoint_streams_tensor_by_tensor() {
    let _heavy = equicrypt_test_support::heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    let out = support::run_ok(&[
        "bench-encrypt".as_ref(),
        "--shape".as_ref(),
        "1b".as_ref(),
        "--dir".as_ref(),
        dir.path().as_os_str(),
    ]);
    println!("{out}");
    let ratio: f64 = out
        .split(" × the largest tensor")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no RSS ratio in {out}"));
    assert!(ratio < 0.5, "peak RSS {ratio} × the largest tensor:\n{out}");
}
