//! Kafka record headers as Azure IoT Hub message routing writes them to an
//! Event Hubs namespace's Kafka endpoint.
//!
//! The Event Hubs protocol bridge passes a few AMQP properties as plain
//! UTF-8 header values (`content-type`, `content-encoding`, `message-id`,
//! `user-id`, `to`, `reply-to`, `creation-time`, see [`PLAIN_UTF8`]); every
//! other system or application property (`iothub-connection-device-id`,
//! `iothub-enqueuedtime`, ...) arrives as one AMQP 1.0 encoded value. The
//! decoder accepts the AMQP constructors the routing uses for those:
//!
//! | constructor | AMQP type     | layout                              |
//! |-------------|---------------|-------------------------------------|
//! | `0xA1`      | `str8-utf8`   | `A1`, 1-byte length, UTF-8 bytes    |
//! | `0xB1`      | `str32-utf8`  | `B1`, 4-byte big-endian length, UTF-8 |
//! | `0x83`      | `timestamp`   | `83`, 8-byte big-endian ms since 1970 |
//!
//! Anything else is a [`HeaderError`] naming what was found.

/// Header carrying the id of the device (the gateway) that sent the
/// message over its own IoT Hub connection: set by IoT Hub, not by the
/// device, so it is the authenticated identity.
pub const DEVICE_ID: &str = "iothub-connection-device-id";
/// Header with the time IoT Hub received the message.
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";
/// Plain header: the message's content type (`$.ct` of the device).
pub const CONTENT_TYPE: &str = "content-type";
/// Plain header: the message's content encoding (`$.ce` of the device).
pub const CONTENT_ENCODING: &str = "content-encoding";

/// Header names whose values the bridge passes as plain UTF-8.
pub const PLAIN_UTF8: [&str; 7] = [
    "content-type",
    "content-encoding",
    "message-id",
    "user-id",
    "to",
    "reply-to",
    "creation-time",
];

/// AMQP `str8-utf8` constructor.
const STR8: u8 = 0xA1;
/// AMQP `str32-utf8` constructor.
const STR32: u8 = 0xB1;
/// AMQP `timestamp` constructor.
const TIMESTAMP: u8 = 0x83;

/// One decoded header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Text(String),
    /// Milliseconds since the Unix epoch (AMQP timestamp).
    Timestamp(i64),
}

/// Why a header value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header `{name}` is empty (an AMQP-encoded value starts with its constructor byte)")]
    Empty { name: String },
    #[error(
        "header `{name}`: AMQP constructor 0x{constructor:02X} is not one the hub decodes (0xA1/0xB1 string, 0x83 timestamp)"
    )]
    UnknownConstructor { name: String, constructor: u8 },
    #[error("header `{name}`: AMQP value needs {needed} bytes, has {got}")]
    Truncated {
        name: String,
        needed: usize,
        got: usize,
    },
    #[error("header `{name}`: {extra} bytes after the AMQP value")]
    Trailing { name: String, extra: usize },
    #[error("header `{name}` is not UTF-8")]
    NotUtf8 { name: String },
    #[error("header `{name}` is a {found}, expected a {expected}")]
    WrongType {
        name: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("header `{name}` appears twice with different values")]
    Conflicting { name: String },
}

/// Decodes one AMQP 1.0 encoded value (the whole of `bytes`) of header `name`.
pub fn decode_amqp(name: &str, bytes: &[u8]) -> Result<HeaderValue, HeaderError> {
    let n = || name.to_owned();
    let (&constructor, rest) = bytes
        .split_first()
        .ok_or_else(|| HeaderError::Empty { name: n() })?;
    let take = |rest: &[u8], needed: usize| -> Result<(), HeaderError> {
        match rest.len().cmp(&needed) {
            std::cmp::Ordering::Less => Err(HeaderError::Truncated {
                name: n(),
                needed,
                got: rest.len(),
            }),
            std::cmp::Ordering::Greater => Err(HeaderError::Trailing {
                name: n(),
                extra: rest.len() - needed,
            }),
            std::cmp::Ordering::Equal => Ok(()),
        }
    };
    let text = |body: &[u8]| -> Result<HeaderValue, HeaderError> {
        std::str::from_utf8(body)
            .map(|s| HeaderValue::Text(s.to_owned()))
            .map_err(|_| HeaderError::NotUtf8 { name: n() })
    };
    match constructor {
        STR8 => {
            let (&len, body) = rest.split_first().ok_or_else(|| HeaderError::Truncated {
                name: n(),
                needed: 1,
                got: 0,
            })?;
            take(body, usize::from(len))?;
            text(body)
        }
        STR32 => {
            let Some((len, body)) = rest.split_first_chunk::<4>() else {
                return Err(HeaderError::Truncated {
                    name: n(),
                    needed: 4,
                    got: rest.len(),
                });
            };
            let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
            take(body, len)?;
            text(body)
        }
        TIMESTAMP => {
            take(rest, 8)?;
            let ms: [u8; 8] = rest.try_into().map_err(|_| HeaderError::Truncated {
                name: n(),
                needed: 8,
                got: rest.len(),
            })?;
            Ok(HeaderValue::Timestamp(i64::from_be_bytes(ms)))
        }
        other => Err(HeaderError::UnknownConstructor {
            name: n(),
            constructor: other,
        }),
    }
}

/// Decodes the value of header `name`: plain UTF-8 for the names in
/// [`PLAIN_UTF8`] (compared without regard to ASCII case), AMQP otherwise.
pub fn decode_header(name: &str, bytes: &[u8]) -> Result<HeaderValue, HeaderError> {
    if PLAIN_UTF8.iter().any(|p| p.eq_ignore_ascii_case(name)) {
        return std::str::from_utf8(bytes)
            .map(|s| HeaderValue::Text(s.to_owned()))
            .map_err(|_| HeaderError::NotUtf8 {
                name: name.to_owned(),
            });
    }
    decode_amqp(name, bytes)
}

/// What the routing headers of one record say, as far as the hub needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingProperties {
    /// `iothub-connection-device-id`: the sending gateway.
    pub device_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `iothub-enqueuedtime`, ms since the Unix epoch.
    pub enqueued_ms: Option<i64>,
}

fn set_once(slot: &mut Option<String>, name: &str, v: HeaderValue) -> Result<(), HeaderError> {
    let HeaderValue::Text(s) = v else {
        return Err(HeaderError::WrongType {
            name: name.to_owned(),
            found: "timestamp",
            expected: "string",
        });
    };
    match slot {
        Some(old) if *old != s => Err(HeaderError::Conflicting {
            name: name.to_owned(),
        }),
        _ => {
            *slot = Some(s);
            Ok(())
        }
    }
}

/// Reads the headers the hub uses from a record's `(name, value)` pairs;
/// others are ignored (not decoded). A header the hub uses that is badly
/// encoded, of the wrong type or repeated with another value is an error.
pub fn routing_properties<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<RoutingProperties, HeaderError> {
    let mut p = RoutingProperties::default();
    for (name, bytes) in headers {
        if name.eq_ignore_ascii_case(DEVICE_ID) {
            set_once(&mut p.device_id, DEVICE_ID, decode_header(name, bytes)?)?;
        } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            set_once(
                &mut p.content_type,
                CONTENT_TYPE,
                decode_header(name, bytes)?,
            )?;
        } else if name.eq_ignore_ascii_case(CONTENT_ENCODING) {
            set_once(
                &mut p.content_encoding,
                CONTENT_ENCODING,
                decode_header(name, bytes)?,
            )?;
        } else if name.eq_ignore_ascii_case(ENQUEUED_TIME) {
            match decode_header(name, bytes)? {
                HeaderValue::Timestamp(ms) => p.enqueued_ms = Some(ms),
                HeaderValue::Text(_) => {
                    return Err(HeaderError::WrongType {
                        name: ENQUEUED_TIME.to_owned(),
                        found: "string",
                        expected: "timestamp",
                    });
                }
            }
        }
    }
    Ok(p)
}

/// AMQP encoding of a string as the routing writes it: `str8-utf8` up to
/// 255 bytes, `str32-utf8` beyond (for tests and test producers).
pub fn encode_amqp_string(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() + 5);
    match u8::try_from(b.len()) {
        Ok(len) => out.extend([STR8, len]),
        Err(_) => {
            out.push(STR32);
            out.extend(u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
    out.extend_from_slice(b);
    out
}

/// AMQP encoding of a timestamp (ms since the Unix epoch).
pub fn encode_amqp_timestamp(ms: i64) -> Vec<u8> {
    let mut out = vec![TIMESTAMP];
    out.extend(ms.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(s: &str) -> Result<HeaderValue, HeaderError> {
        Ok(HeaderValue::Text(s.into()))
    }

    #[test]
    fn amqp_str8() {
        // A1 = str8-utf8, 04 = length, then "gw-1".
        assert_eq!(
            decode_amqp("d", &[0xA1, 0x04, b'g', b'w', b'-', b'1']),
            text("gw-1")
        );
        // A1 00: the empty string.
        assert_eq!(decode_amqp("d", &[0xA1, 0x00]), text(""));
        // A1 05 but only 4 bytes follow.
        assert_eq!(
            decode_amqp("d", &[0xA1, 0x05, b'g', b'w', b'-', b'1']),
            Err(HeaderError::Truncated {
                name: "d".into(),
                needed: 5,
                got: 4
            })
        );
        // A1 alone: the length byte is missing.
        assert!(matches!(
            decode_amqp("d", &[0xA1]),
            Err(HeaderError::Truncated {
                needed: 1,
                got: 0,
                ..
            })
        ));
        // A1 01 'a' 'b': one byte too many.
        assert_eq!(
            decode_amqp("d", &[0xA1, 0x01, b'a', b'b']),
            Err(HeaderError::Trailing {
                name: "d".into(),
                extra: 1
            })
        );
        // A1 02 C3 28: an invalid UTF-8 sequence.
        assert_eq!(
            decode_amqp("d", &[0xA1, 0x02, 0xC3, 0x28]),
            Err(HeaderError::NotUtf8 { name: "d".into() })
        );
    }

    #[test]
    fn amqp_str32() {
        // B1 = str32-utf8, 00 00 00 03 = length 3 (big-endian), "abc".
        assert_eq!(
            decode_amqp("d", &[0xB1, 0x00, 0x00, 0x00, 0x03, b'a', b'b', b'c']),
            text("abc")
        );
        // B1 with a 3-byte length field.
        assert!(matches!(
            decode_amqp("d", &[0xB1, 0x00, 0x00, 0x03]),
            Err(HeaderError::Truncated {
                needed: 4,
                got: 3,
                ..
            })
        ));
        // B1 FF FF FF FF: a 4 GiB length with 1 byte present.
        assert!(matches!(
            decode_amqp("d", &[0xB1, 0xFF, 0xFF, 0xFF, 0xFF, b'a']),
            Err(HeaderError::Truncated { got: 1, .. })
        ));
        // 300 bytes need str32: B1 00 00 01 2C then the text.
        let long = "x".repeat(300);
        let enc = encode_amqp_string(&long);
        assert_eq!(enc[..5], [0xB1, 0x00, 0x00, 0x01, 0x2C]);
        assert_eq!(decode_amqp("d", &enc), text(&long));
    }

    #[test]
    fn amqp_timestamp() {
        // 83 = timestamp, then 1 700 000 000 000 ms = 0x18B_CFE5_6800 big-endian.
        let b = [0x83, 0x00, 0x00, 0x01, 0x8B, 0xCF, 0xE5, 0x68, 0x00];
        assert_eq!(
            decode_amqp("t", &b),
            Ok(HeaderValue::Timestamp(1_700_000_000_000))
        );
        // 83 FF..FF: -1 ms (before the epoch) is still a timestamp.
        let mut neg = vec![0x83];
        neg.extend([0xFF; 8]);
        assert_eq!(decode_amqp("t", &neg), Ok(HeaderValue::Timestamp(-1)));
        // 83 with 7 bytes.
        assert!(matches!(
            decode_amqp("t", &b[..8]),
            Err(HeaderError::Truncated {
                needed: 8,
                got: 7,
                ..
            })
        ));
    }

    #[test]
    fn other_constructors_and_empty_values_are_errors() {
        // 0x40 = AMQP null, 0xA3 = sym8, 0x71 = int: not decoded.
        for c in [0x40u8, 0xA3, 0x71, 0x00] {
            let e = decode_amqp("iothub-x", &[c, 0x00]).unwrap_err();
            assert_eq!(
                e,
                HeaderError::UnknownConstructor {
                    name: "iothub-x".into(),
                    constructor: c
                }
            );
            assert!(e.to_string().contains(&format!("0x{c:02X}")), "{e}");
        }
        assert_eq!(
            decode_amqp("d", &[]),
            Err(HeaderError::Empty { name: "d".into() })
        );
        // A plain device id (as a non-IoT-Hub producer might send it) is not AMQP:
        // 'g' = 0x67 is no constructor.
        assert!(matches!(
            decode_header(DEVICE_ID, b"gw-1"),
            Err(HeaderError::UnknownConstructor {
                constructor: 0x67,
                ..
            })
        ));
    }

    #[test]
    fn plain_headers_are_utf8() {
        assert_eq!(
            decode_header("content-type", b"application/x-protobuf"),
            text("application/x-protobuf")
        );
        assert_eq!(decode_header("Content-Encoding", b"zstd"), text("zstd"));
        // An AMQP-looking plain header is taken literally (A1 01 'a' is valid UTF-8? no:
        // 0xA1 is a continuation byte, so it is refused as not UTF-8).
        assert_eq!(
            decode_header("content-type", &[0xA1, 0x01, b'a']),
            Err(HeaderError::NotUtf8 {
                name: "content-type".into()
            })
        );
    }

    #[test]
    fn routing_properties_of_an_iot_hub_record() {
        let dev = encode_amqp_string("gw-1");
        let ts = encode_amqp_timestamp(1_700_000_000_000);
        let src = encode_amqp_string("Telemetry");
        let h: Vec<(&str, &[u8])> = vec![
            ("content-type", b"application/x-protobuf"),
            ("content-encoding", b"zstd"),
            ("x-opt-partition-key", &dev),
            (DEVICE_ID, &dev),
            ("iothub-message-source", &src),
            (ENQUEUED_TIME, &ts),
            // Unused headers are never decoded, so a malformed one is ignored.
            ("iothub-app-whatever", &[0x40]),
        ];
        assert_eq!(
            routing_properties(h),
            Ok(RoutingProperties {
                device_id: Some("gw-1".into()),
                content_type: Some("application/x-protobuf".into()),
                content_encoding: Some("zstd".into()),
                enqueued_ms: Some(1_700_000_000_000),
            })
        );
        assert_eq!(routing_properties([]), Ok(RoutingProperties::default()));
    }

    #[test]
    fn routing_properties_refuse_conflicts_and_wrong_types() {
        let a = encode_amqp_string("gw-1");
        let b = encode_amqp_string("gw-2");
        assert_eq!(
            routing_properties([(DEVICE_ID, &a[..]), (DEVICE_ID, &a[..])])
                .unwrap()
                .device_id
                .as_deref(),
            Some("gw-1")
        );
        assert!(matches!(
            routing_properties([(DEVICE_ID, &a[..]), (DEVICE_ID, &b[..])]),
            Err(HeaderError::Conflicting { .. })
        ));
        let ts = encode_amqp_timestamp(5);
        assert!(matches!(
            routing_properties([(DEVICE_ID, &ts[..])]),
            Err(HeaderError::WrongType {
                expected: "string",
                ..
            })
        ));
        assert!(matches!(
            routing_properties([(ENQUEUED_TIME, &a[..])]),
            Err(HeaderError::WrongType {
                expected: "timestamp",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn strings_round_trip(s in ".{0,400}") {
            prop_assert_eq!(decode_amqp("p", &encode_amqp_string(&s)), Ok(HeaderValue::Text(s)));
        }

        #[test]
        fn timestamps_round_trip(ms in any::<i64>()) {
            prop_assert_eq!(decode_amqp("p", &encode_amqp_timestamp(ms)), Ok(HeaderValue::Timestamp(ms)));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Never panics; a decoded string re-encodes to the same bytes
            // when it came as str8 (the canonical form for short strings).
            if let Ok(HeaderValue::Text(s)) = decode_amqp("p", &b) {
                if b[0] == STR8 {
                    prop_assert_eq!(encode_amqp_string(&s), b);
                }
            }
        }

        #[test]
        fn a_truncated_value_is_an_error(s in ".{1,40}") {
            let enc = encode_amqp_string(&s);
            for cut in 0..enc.len() {
                prop_assert!(decode_amqp("p", &enc[..cut]).is_err());
            }
        }
    }
}
