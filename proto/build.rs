fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so that a fresh machine needs no system package to build meshlet.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_protos(&["proto/meshlet.proto"], &["proto"])?;
    Ok(())
}
