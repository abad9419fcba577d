//! The changed properties of a unit's `PropertiesChanged`, read for the few a unit's state is
//! made of. systemd sends dozens with each change of a service (its `Exec*` arrays of
//! structures among them); building a value for each, to keep a handful, was most of what
//! modvisord spent on a cold start's signals. The others are walked over as they are read,
//! without building anything.

use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use zbus::Variant;
use zbus::{Signature, Type};

/// The wanted entries of an `a{sv}`, borrowed from the message.
pub struct Wanted<'b> {
    pub values: Vec<(&'b str, Variant<'b>)>,
}

/// Whether a property is one [`super::UnitStatus`] is made of.
pub fn wanted(k: &str) -> bool {
    super::UNIT_PROPS.contains(&k) || super::SERVICE_PROPS.contains(&k)
}

impl Type for Wanted<'_> {
    const SIGNATURE: &'static Signature =
        <std::collections::HashMap<&str, Variant<'static>> as Type>::SIGNATURE;
}

impl<'de> Deserialize<'de> for Wanted<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(WantedVisitor)
    }
}

struct WantedVisitor;

impl<'de> Visitor<'de> for WantedVisitor {
    type Value = Wanted<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a dictionary of properties (a{sv})")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wanted<'de>, A::Error> {
        let mut values = Vec::new();
        while let Some(k) = map.next_key::<&'de str>()? {
            if wanted(k) {
                values.push((k, map.next_value::<Variant<'de>>()?));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Wanted { values })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zbus::OwnedObjectPath;
    use zbus::message::Message;

    use super::*;

    type Exec<'a> = (
        &'a str,
        Vec<&'a str>,
        bool,
        u64,
        u64,
        u64,
        u64,
        u32,
        i32,
        i32,
    );

    /// A Service change as systemd sends it: what the state is made of among what it is not,
    /// nested arrays of structures and variants included.
    fn service_change() -> Message {
        let exec: Vec<Exec<'_>> = vec![(
            "/bin/sleep",
            vec!["/bin/sleep", "1000"],
            false,
            1,
            2,
            3,
            4,
            4242,
            1,
            0,
        )];
        let mut props: HashMap<&str, Variant<'_>> = HashMap::new();
        props.insert("ExecStart", Variant::from(exec));
        props.insert("MainPID", Variant::from(4242u32));
        props.insert("StatusText", Variant::from("loading the model"));
        props.insert("Result", Variant::from("success"));
        props.insert(
            "Nested",
            Variant::Variant(Box::new(Variant::Variant(Box::new(Variant::from(7u8))))),
        );
        props.insert("NRestarts", Variant::from(3u32));
        props.insert(
            "Job",
            Variant::from((5u32, OwnedObjectPath::try_from("/j/5").expect("path"))),
        );
        let body = (
            "org.freedesktop.systemd1.Service",
            props,
            vec!["Environment"],
        );
        Message::signal(
            "/org/freedesktop/systemd1/unit/x",
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .build(&body)
        .expect("a valid signal")
    }

    #[test]
    fn keeps_what_the_state_is_made_of_and_walks_over_the_rest() {
        let msg = service_change();
        let body = msg.body();
        let (iface, wanted, invalidated): (&str, Wanted<'_>, Vec<&str>) =
            body.deserialize().expect("a PropertiesChanged body");
        assert_eq!(iface, "org.freedesktop.systemd1.Service");
        assert_eq!(invalidated, vec!["Environment"]);
        let mut got: Vec<(&str, String)> = wanted
            .values
            .iter()
            .map(|(k, v)| (*k, format!("{v:?}")))
            .collect();
        got.sort();
        let names: Vec<&str> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, vec!["Job", "MainPID", "NRestarts", "Result"]);
        let value = |k: &str| {
            wanted
                .values
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.try_clone().expect("clone"))
        };
        assert_eq!(value("MainPID"), Some(Variant::from(4242u32)));
        assert_eq!(value("NRestarts"), Some(Variant::from(3u32)));
        assert_eq!(value("Result"), Some(Variant::from("success")));
    }

    #[test]
    fn a_body_of_another_shape_is_an_error_not_a_guess() {
        let msg = Message::signal("/u", "org.freedesktop.DBus.Properties", "PropertiesChanged")
            .build(&("org.freedesktop.systemd1.Unit", vec!["not", "a", "dict"]))
            .expect("a valid signal");
        let body = msg.body();
        assert!(body.deserialize::<(&str, Wanted<'_>, Vec<&str>)>().is_err());
    }
}
