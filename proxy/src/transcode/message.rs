//! Between URL/JSON and protobuf: request fields from path variables and query parameters,
//! request bodies from JSON (proto3 JSON mapping, through prost-reflect's serde support), and
//! response messages back to JSON.

use bytes::Bytes;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, SerializeOptions, Value,
};

use super::template::percent_decode;

/// A field by its proto name, or by its JSON name (`pageSize` for `page_size`), as proto3 JSON
/// parsers accept both.
pub fn find_field(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
}

/// Checks that `path` names a field settable from a URL, walking singular message fields.
pub fn check_field_path(desc: &MessageDescriptor, path: &[String]) -> Result<(), String> {
    let mut desc = desc.clone();
    for (i, name) in path.iter().enumerate() {
        let field = find_field(&desc, name).ok_or_else(|| format!("{} has no field {name:?}", desc.full_name()))?;
        if i + 1 == path.len() {
            if field.is_map() {
                return Err(format!("field {} is a map, which a URL cannot set", path.join(".")));
            }
            return Ok(());
        }
        match field.kind() {
            Kind::Message(m) if !field.is_list() && !field.is_map() => desc = m,
            _ => {
                return Err(format!(
                    "field {name} is not a message, so it has no field {:?}",
                    path[i + 1]
                ))
            }
        }
    }
    Ok(())
}

/// Sets the field at `path` from URL text: a scalar is replaced, a repeated field gets one more
/// element (`?tag=a&tag=b`).
pub fn set_field_path(msg: &mut DynamicMessage, path: &[String], raw: &str) -> Result<(), String> {
    set_path(msg, path, raw).map_err(|e| format!("{}: {e}", path.join(".")))
}

fn set_path(msg: &mut DynamicMessage, path: &[String], raw: &str) -> Result<(), String> {
    let desc = msg.descriptor();
    let Some((name, rest)) = path.split_first() else {
        return Err("empty field path".into());
    };
    let field = find_field(&desc, name).ok_or_else(|| format!("{} has no field {name:?}", desc.full_name()))?;
    if field.is_map() {
        return Err("a map field cannot be set from a URL".into());
    }
    if rest.is_empty() {
        let v = parse_value(&field.kind(), raw)?;
        if field.is_list() {
            if let Some(list) = msg.get_field_mut(&field).as_list_mut() {
                list.push(v);
            }
        } else {
            msg.set_field(&field, v);
        }
        return Ok(());
    }
    if field.is_list() || !matches!(field.kind(), Kind::Message(_)) {
        return Err(format!("{name} is not a message field"));
    }
    match msg.get_field_mut(&field).as_message_mut() {
        Some(m) => set_path(m, rest, raw),
        None => Err(format!("{name} is not a message field")),
    }
}

/// One URL value as a field of `kind` (the proto3 JSON forms of scalars, unquoted).
pub fn parse_value(kind: &Kind, raw: &str) -> Result<Value, String> {
    let bad = |what: &str| format!("{raw:?} is not {what}");
    Ok(match kind {
        Kind::Double => Value::F64(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Float => Value::F32(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(raw.parse().map_err(|_| bad("a 32-bit integer"))?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(raw.parse().map_err(|_| bad("a 64-bit integer"))?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(raw.parse().map_err(|_| bad("an unsigned 32-bit integer"))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(raw.parse().map_err(|_| bad("an unsigned 64-bit integer"))?),
        Kind::Bool => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        Kind::String => Value::String(raw.to_string()),
        Kind::Bytes => {
            use base64::Engine as _;
            let e = base64::engine::general_purpose::STANDARD;
            let u = base64::engine::general_purpose::URL_SAFE;
            let trimmed = raw.trim_end_matches('=');
            let d = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(trimmed)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
                .or_else(|_| e.decode(raw))
                .or_else(|_| u.decode(raw))
                .map_err(|_| bad("base64"))?;
            Value::Bytes(Bytes::from(d))
        }
        Kind::Enum(e) => match e.get_value_by_name(raw) {
            Some(v) => Value::EnumNumber(v.number()),
            None => Value::EnumNumber(raw.parse().map_err(|_| bad(&format!("a value of {}", e.full_name())))?),
        },
        // Well-known types written as strings in JSON (Timestamp, Duration, FieldMask, the
        // wrappers) take the same text in a URL.
        Kind::Message(m) => {
            let msg = DynamicMessage::deserialize(m.clone(), serde_json::Value::String(raw.to_string()))
                .map_err(|e| format!("{raw:?} is not a {}: {e}", m.full_name()))?;
            Value::Message(msg)
        }
    })
}

/// `a=1&b.c=x+y&tag=a&tag=b` as decoded (name, value) pairs, in order.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true, false), percent_decode(v, true, false))
        })
        .collect()
}

/// A request body (proto3 JSON) as a message of type `desc`; unknown fields are an error.
pub fn message_from_json(desc: &MessageDescriptor, json: &[u8]) -> Result<DynamicMessage, String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let msg = DynamicMessage::deserialize(desc.clone(), &mut de).map_err(|e| json_error(desc, e))?;
    de.end().map_err(|e| json_error(desc, e))?;
    Ok(msg)
}

/// A body bound to one field (`body: "book"`): the JSON is that field's value.
pub fn field_from_json(
    desc: &MessageDescriptor,
    field: &FieldDescriptor,
    json: &[u8],
) -> Result<DynamicMessage, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| json_error(desc, e))?;
    let mut object = serde_json::Map::new();
    object.insert(field.name().to_string(), value);
    DynamicMessage::deserialize(desc.clone(), serde_json::Value::Object(object)).map_err(|e| json_error(desc, e))
}

fn json_error(desc: &MessageDescriptor, e: serde_json::Error) -> String {
    let mut msg = format!("invalid JSON for {}: {e}", desc.full_name());
    // serde's "expected one of ..." lists can be long; the reason stays one short line.
    if msg.len() > 300 {
        let mut end = 300;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push('…');
    }
    msg
}

/// A response message as JSON (lowerCamelCase names, 64-bit integers as strings, default values
/// omitted: the canonical proto3 JSON mapping). With `response_body`, only that field.
pub fn message_to_json(
    desc: &MessageDescriptor,
    response_body: Option<&FieldDescriptor>,
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    let msg =
        DynamicMessage::decode(desc.clone(), bytes).map_err(|e| format!("not a valid {}: {e}", desc.full_name()))?;
    match response_body {
        None => {
            let mut ser = serde_json::Serializer::new(Vec::new());
            msg.serialize_with_options(&mut ser, &SerializeOptions::new())
                .map_err(|e| e.to_string())?;
            Ok(ser.into_inner())
        }
        Some(field) => {
            let json = |m: &DynamicMessage, opts: &SerializeOptions| {
                m.serialize_with_options(serde_json::value::Serializer, opts)
                    .map(|v| v.get(field.json_name()).cloned())
                    .map_err(|e| e.to_string())
            };
            // A field left at its default is absent from canonical JSON; its default then comes
            // from an empty message serialized with defaults (`[]`, `0`, `""`), so nested
            // messages keep the canonical form.
            let v = match json(&msg, &SerializeOptions::new())? {
                Some(v) => v,
                None => json(
                    &DynamicMessage::new(desc.clone()),
                    &SerializeOptions::new().skip_default_fields(false),
                )?
                .unwrap_or(serde_json::Value::Null),
            };
            serde_json::to_vec(&v).map_err(|e| e.to_string())
        }
    }
}
