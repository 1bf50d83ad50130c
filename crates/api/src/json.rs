//! How every role reads a JSON body: as `serde_json` does, except in two ways that make the
//! server agree with the documents (JSON Schema):
//!
//! - a number with no fractional part is an integer however it is written (`18.0`, `1.8e1`):
//!   clients that compute numbers as floats are not refused a body the documents call valid. A
//!   number with a fraction is still refused where an integer is expected, and float fields
//!   still take integers;
//! - an object is only read from a JSON object: `serde` would also read one from an array of
//!   its fields in order (`[null, null]` for a quota), which the documents call invalid.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Error, Number, Value};

/// `serde_json::from_slice` with the rules of the module doc.
pub fn from_slice<T: DeserializeOwned>(data: &[u8]) -> serde_json::Result<T> {
    let v: Value = serde_json::from_slice(data)?;
    T::deserialize(Strict(&v))
}

/// `serde_json::from_value` with the rules of the module doc.
pub fn from_value<T: DeserializeOwned>(v: Value) -> serde_json::Result<T> {
    T::deserialize(Strict(&v))
}

/// A `Value` as a deserializer with the rules of the module doc.
struct Strict<'a>(&'a Value);

impl Strict<'_> {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self.0 {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Number(_) => de::Unexpected::Other("number"),
            Value::String(s) => de::Unexpected::Str(s),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Object(_) => de::Unexpected::Map,
        }
    }
}

impl<'de> de::Deserializer<'de> for Strict<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Number(n) => number(n, v),
            Value::String(s) => v.visit_str(s),
            Value::Array(a) => {
                let mut seq = Seq(a.iter());
                let r = v.visit_seq(&mut seq)?;
                match seq.0.len() {
                    0 => Ok(r),
                    _ => Err(de::Error::invalid_length(a.len(), &"fewer elements in array")),
                }
            }
            Value::Object(o) => {
                let mut map = Map { entries: o.iter(), value: None };
                let r = v.visit_map(&mut map)?;
                match map.entries.len() {
                    0 => Ok(r),
                    _ => Err(de::Error::invalid_length(o.len(), &"fewer elements in map")),
                }
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, v: V) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(self, _name: &'static str, _fields: &'static [&'static str], v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(v),
            _ => Err(de::Error::invalid_type(self.unexpected(), &v)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(self, _name: &'static str, _variants: &'static [&'static str], v: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => v.visit_enum(s.as_str().into_deserializer()),
            Value::Object(o) if o.len() == 1 => {
                let (variant, value) = o.iter().next().expect("one entry");
                v.visit_enum(Enum { variant, value })
            }
            _ => Err(de::Error::invalid_type(self.unexpected(), &"a string or an object with one key")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq
        tuple tuple_struct map identifier
    }
}

/// A number, integral floats as integers.
fn number<'de, V: Visitor<'de>>(n: &Number, v: V) -> Result<V::Value, Error> {
    if let Some(u) = n.as_u64() {
        return v.visit_u64(u);
    }
    if let Some(i) = n.as_i64() {
        return v.visit_i64(i);
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    match integer_of(f) {
        Some(Integer::Unsigned(u)) => v.visit_u64(u),
        Some(Integer::Signed(i)) => v.visit_i64(i),
        None => v.visit_f64(f),
    }
}

struct Seq<'a>(std::slice::Iter<'a, Value>);

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.0.next().map(|v| seed.deserialize(Strict(v))).transpose()
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Map<'a> {
    entries: serde_json::map::Iter<'a>,
    value: Option<&'a Value>,
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(k.as_str().into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Error> {
        let v = self.value.take().ok_or_else(|| <Error as de::Error>::custom("a map value asked for before its key"))?;
        seed.deserialize(Strict(v))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An externally tagged enum variant with content: `{"variant": value}`.
struct Enum<'a> {
    variant: &'a String,
    value: &'a Value,
}

impl<'de, 'a> de::EnumAccess<'de> for Enum<'a> {
    type Error = Error;
    type Variant = Strict<'a>;
    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Strict<'a>), Error> {
        let variant = seed.deserialize(self.variant.as_str().into_deserializer())?;
        Ok((variant, Strict(self.value)))
    }
}

impl<'de> de::VariantAccess<'de> for Strict<'_> {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        match self.0 {
            Value::Null => Ok(()),
            _ => Err(de::Error::invalid_type(self.unexpected(), &"unit variant")),
        }
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, v)
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, v)
    }
}

enum Integer {
    Unsigned(u64),
    Signed(i64),
}

/// The integer `f` is, when it is one that `i64` or `u64` holds exactly.
fn integer_of(f: f64) -> Option<Integer> {
    // 2^63 and 2^64 are exact as floats; `as` saturates, so the bounds are checked first.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if !f.is_finite() || f.fract() != 0.0 {
        return None;
    }
    if (-TWO_63..0.0).contains(&f) {
        Some(Integer::Signed(f as i64))
    } else if (0.0..TWO_64).contains(&f) {
        Some(Integer::Unsigned(f as u64))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Body {
        cpus: u32,
        memory: Option<u64>,
        offset: i64,
        share: f64,
        #[serde(default)]
        ports: Vec<(u16, u16)>,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Off,
        Limit(u32),
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Optional {
        #[serde(default)]
        vms: Option<u32>,
        #[serde(default)]
        cpus: Option<u32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(tag = "kind", rename_all = "lowercase")]
    enum Tagged {
        Disk { size: u64 },
    }

    #[test]
    fn integral_floats_are_integers_and_other_numbers_keep_their_meaning() {
        let b: Body =
            from_slice(br#"{"cpus": 18.0, "memory": 1.5e3, "offset": -4.0, "share": 2, "ports": [[22.0, 80]], "mode": {"limit": 3.0}}"#)
                .unwrap();
        assert_eq!(b, Body { cpus: 18, memory: Some(1500), offset: -4, share: 2.0, ports: vec![(22, 80)], mode: Some(Mode::Limit(3)) });
        let b: Body = from_slice(br#"{"cpus": 1, "memory": null, "offset": 0, "share": 0.5, "mode": "off"}"#).unwrap();
        assert_eq!(b, Body { cpus: 1, memory: None, offset: 0, share: 0.5, ports: vec![], mode: Some(Mode::Off) });
        assert_eq!(from_slice::<u8>(b"-0.0").unwrap(), 0);
        assert_eq!(from_slice::<Tagged>(br#"{"kind": "disk", "size": 4.0}"#).unwrap(), Tagged::Disk { size: 4 });
        assert_eq!(from_value::<Vec<u8>>(serde_json::json!([1.0, 2])).unwrap(), vec![1, 2]);
        assert_eq!(from_slice::<std::collections::BTreeMap<String, u8>>(br#"{"a": 1.0}"#).unwrap()["a"], 1);
    }

    #[test]
    fn fractions_and_out_of_range_numbers_are_still_refused() {
        let e = from_slice::<Body>(br#"{"cpus": 18.5, "offset": 0, "share": 1}"#).unwrap_err();
        assert!(e.to_string().contains("18.5"), "{e}");
        let e = from_slice::<Body>(br#"{"cpus": 1e10, "offset": 0, "share": 1}"#).unwrap_err();
        assert!(e.to_string().contains("10000000000"), "{e}");
        // Beyond u64 and i64: left a float, refused as one.
        assert!(from_slice::<u64>(b"1.8446744073709552e19").is_err());
        assert!(from_slice::<i64>(b"-9.3e18").is_err());
        assert_eq!(from_slice::<u64>(b"18446744073709549568.0").unwrap(), 18_446_744_073_709_549_568);
        assert_eq!(from_slice::<i64>(b"-9.223372036854775808e18").unwrap(), i64::MIN);
        // Not JSON: serde_json's own message, with its position.
        let e = from_slice::<Body>(b"{\"cpus\": 1.0,").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn objects_come_only_from_objects() {
        assert_eq!(from_slice::<Optional>(b"{}").unwrap(), Optional::default());
        for not_an_object in ["[]", "[null, null]", "[1, 2]", "null", "3", "\"x\""] {
            assert!(from_slice::<Optional>(not_an_object.as_bytes()).is_err(), "{not_an_object}");
        }
        assert!(from_slice::<Optional>(br#"{"vms": 1, "other": 2}"#).is_err());
        // Tuples are arrays of exactly their length.
        assert!(from_slice::<(u8, u8)>(b"[1, 2, 3]").is_err());
        assert!(from_slice::<Mode>(br#"{"limit": 1, "off": null}"#).is_err());
    }
}
