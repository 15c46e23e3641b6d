fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so that a fresh machine needs no system package to build meshlet.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    // The policy messages are also what operators write in the reference control plane's
    // file, so they read and write as JSON with the proto's own field names.
    let mut config = tonic_prost_build::configure();
    for message in [
        "MeshPolicy",
        "ModeRule",
        "AuthorizationPolicy",
        "Rule",
        "Source",
        "Destination",
        "Service",
        "ServicePort",
        "Endpoint",
        "ExternalService",
    ] {
        config = config.type_attribute(
            format!(".meshlet.v1.{message}"),
            "#[derive(serde::Deserialize, serde::Serialize)] #[serde(default, deny_unknown_fields)]",
        );
    }
    // The whole discovery update too, so that a config dump carries what the agent applied.
    for message in [
        "DiscoveryResponse",
        "Workload",
        "FederatedBundle",
        "MeshScope",
    ] {
        config = config.type_attribute(
            format!(".meshlet.v1.{message}"),
            "#[derive(serde::Deserialize, serde::Serialize)] #[serde(default)]",
        );
    }
    config.compile_protos(&["proto/meshlet.proto"], &["proto"])?;
    Ok(())
}
