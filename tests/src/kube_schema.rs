//! The part of a CRD's structural schema the emulated API server enforces, as the real one
//! does for custom resources: fields the schema does not declare are pruned, or refused when
//! the client asks for strict field validation (`fieldValidation=Strict`, which kubectl sends);
//! types and `enum`s are checked. The schemas are the chart's own CRDs, so a field the chart
//! forgot fails a test the way it would fail a user.
use std::{collections::BTreeMap, sync::OnceLock};

use serde_json::Value;

/// What is wrong with an object.
#[derive(Debug, PartialEq, Eq)]
pub enum SchemaError {
    /// Fields the schema does not declare, under strict validation (400 BadRequest).
    Unknown(Vec<String>),
    /// Values of the wrong type or outside an enum (422 Invalid).
    Invalid(Vec<String>),
}

/// The `openAPIV3Schema` of each kind in the chart's CRDs, by (group, plural).
fn schemas() -> &'static BTreeMap<(String, String), Value> {
    static SCHEMAS: OnceLock<BTreeMap<(String, String), Value>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let text = include_str!("../../deploy/helm/meshlet/crds/security.meshlet.dev.yaml");
        let mut out = BTreeMap::new();
        for document in serde_norway::Deserializer::from_str(text) {
            let Ok(crd) = <Value as serde::Deserialize>::deserialize(document) else {
                continue;
            };
            let spec = &crd["spec"];
            let (Some(group), Some(plural)) =
                (spec["group"].as_str(), spec["names"]["plural"].as_str())
            else {
                continue;
            };
            if let Some(schema) = spec["versions"][0]["schema"].get("openAPIV3Schema") {
                out.insert((group.to_string(), plural.to_string()), schema.clone());
            }
        }
        out
    })
}

/// Checks `object` of `group`/`plural` against its schema (kinds without one pass as they
/// are), pruning what the schema does not declare unless `strict`.
pub fn admit(
    group: &str,
    plural: &str,
    object: &mut Value,
    strict: bool,
) -> Result<(), SchemaError> {
    let Some(schema) = schemas().get(&(group.to_string(), plural.to_string())) else {
        return Ok(());
    };
    let (mut unknown, mut invalid) = (Vec::new(), Vec::new());
    check(schema, object, "", strict, &mut unknown, &mut invalid);
    if !unknown.is_empty() {
        return Err(SchemaError::Unknown(unknown));
    }
    if !invalid.is_empty() {
        return Err(SchemaError::Invalid(invalid));
    }
    Ok(())
}

fn check(
    schema: &Value,
    value: &mut Value,
    path: &str,
    strict: bool,
    unknown: &mut Vec<String>,
    invalid: &mut Vec<String>,
) {
    let type_ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok && !value.is_null() {
        invalid.push(format!(
            "{path}: Invalid value: {value}: {path} in body must be of type {}",
            schema["type"].as_str().unwrap_or("?")
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let supported: Vec<String> = allowed.iter().map(Value::to_string).collect();
            invalid.push(format!(
                "{path}: Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            ));
        }
    }
    match value {
        Value::Object(fields) => {
            if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
                && schema.get("properties").is_none()
            {
                return;
            }
            let join = |name: &str| match path {
                "" => name.to_string(),
                _ => format!("{path}.{name}"),
            };
            let mut undeclared = Vec::new();
            for (name, field_value) in fields.iter_mut() {
                // The API server's own fields, whatever the schema says.
                if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let field_path = join(name);
                match (
                    schema["properties"].get(name),
                    schema.get("additionalProperties"),
                ) {
                    (Some(field), _) => {
                        check(field, field_value, &field_path, strict, unknown, invalid)
                    }
                    (None, Some(Value::Bool(true))) => {}
                    (None, Some(each @ Value::Object(_))) => {
                        check(each, field_value, &field_path, strict, unknown, invalid)
                    }
                    _ if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) => {}
                    _ => undeclared.push(name.clone()),
                }
            }
            if strict {
                unknown.extend(undeclared.iter().map(|name| join(name)));
            } else {
                fields.retain(|name, _| !undeclared.contains(name));
            }
        }
        Value::Array(items) => {
            if let Some(each) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(
                        each,
                        item,
                        &format!("{path}[{i}]"),
                        strict,
                        unknown,
                        invalid,
                    );
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GROUP: &str = "security.meshlet.dev";

    #[test]
    fn undeclared_fields_are_pruned_or_refused_and_enums_hold() {
        let mut typo = json!({"apiVersion": "security.meshlet.dev/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "x"}, "spec": {"mtls": {"mod": "STRICT"}, "selector": {"matchLabels": {"app": "web"}}}});
        assert_eq!(
            admit(GROUP, "peerauthentications", &mut typo.clone(), true),
            Err(SchemaError::Unknown(vec!["spec.mtls.mod".into()]))
        );
        admit(GROUP, "peerauthentications", &mut typo, false).expect("pruned");
        assert_eq!(typo["spec"]["mtls"], json!({}));
        assert_eq!(typo["spec"]["selector"]["matchLabels"]["app"], "web");
        let mut wrong =
            json!({"spec": {"mtls": {"mode": "STRCT"}, "portLevelMtls": {"8080": {"mode": 1}}}});
        let Err(SchemaError::Invalid(errors)) =
            admit(GROUP, "peerauthentications", &mut wrong, true)
        else {
            panic!("an invalid mode passed");
        };
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.mtls.mode: Unsupported value: \"STRCT\"")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("spec.portLevelMtls.8080.mode in body must be of type string")),
            "{errors:?}"
        );
        // AuthorizationPolicy keeps Istio's whole shape: the control plane judges it.
        let mut istio = json!({"spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}});
        admit(GROUP, "authorizationpolicies", &mut istio, true).expect("kept");
        assert_eq!(
            istio["spec"]["rules"][0]["to"][0]["operation"]["methods"][0],
            "GET"
        );
        // Kinds without a schema pass.
        admit("", "pods", &mut json!({"spec": {"anything": 1}}), true).expect("no schema");
    }
}
