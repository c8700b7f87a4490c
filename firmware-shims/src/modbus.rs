//! A Modbus device (slave/server) whose registers follow a register map and
//! a scenario: a Modbus TCP server (`--listen`) or an RTU slave on a serial
//! port (`--port`), answering reads of holding/input registers, coils and
//! discrete inputs (functions 0x01–0x04) for its unit id only.
//!
//! The map file is the same format the driver reads (parsed with
//! `device_drivers::modbus::map`), but the values are *encoded* here, from
//! this file's own reading of the byte orders, so the interop tests check
//! two implementations against each other. The ADU framing is tokio-modbus's
//! server side.

use std::collections::BTreeMap;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use device_drivers::modbus::map::{self, Point, Sentinel, Table, ValueType, WordOrder};
use shared_protocol::catalogue::codes;
use tokio::time::Instant;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Scenario played by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Constant nominal values (exactly representable, for interop tests).
    Stable,
    /// Values drift step by step: RR and HR rise, SpO2 falls, PIP rises.
    Deteriorating,
    /// Stable, but in every 6 steps the last 3 have the pulse-oximetry and
    /// heart-rate points unavailable (their first `invalid` sentinel, NaN
    /// for floats without one).
    SensorOff,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("link").required(true).args(["listen", "port"])))]
pub struct ModbusArgs {
    /// Serve Modbus TCP on this address (port 0: any free port; the bound
    /// address is printed on stdout as `listening <addr>`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve Modbus RTU as a slave on this serial port (e.g. one end of a
    /// socat PTY pair).
    #[arg(long)]
    pub port: Option<String>,
    /// RTU serial speed (8E1, the Modbus serial-line default framing).
    #[arg(long, default_value_t = 19200)]
    pub baud_rate: u32,
    /// Unit identifier (slave address) answered; requests for others get no
    /// answer.
    #[arg(long, default_value_t = 1)]
    pub unit_id: u8,
    #[arg(long, value_enum, default_value = "stable")]
    pub scenario: Scenario,
    /// Register map (the same TOML format as the agent's `map` option).
    #[arg(long)]
    pub map: PathBuf,
    /// Time between scenario steps (register updates).
    #[arg(long, default_value_t = 1000)]
    pub step_ms: u64,
    /// Stop answering this many seconds after start (connections and the
    /// port stay open), as a hung device would.
    #[arg(long)]
    pub go_silent_after_s: Option<f64>,
    /// Answer reads of unmapped addresses with exception 0x02 (ILLEGAL DATA
    /// ADDRESS) instead of zeros.
    #[arg(long)]
    pub strict_addresses: bool,
    /// Print each step's values and registers on stdout.
    #[arg(long)]
    pub echo: bool,
}

/// The device's data tables.
#[derive(Debug, Default)]
pub struct Tables {
    pub holding: BTreeMap<u16, u16>,
    pub input: BTreeMap<u16, u16>,
    pub coils: BTreeMap<u16, bool>,
    pub discrete: BTreeMap<u16, bool>,
}

/// Nominal value of a metric, by MDC code, in the catalogue's canonical
/// unit of that metric (the map's scale/offset give the raw value).
fn nominal(mdc: u32) -> f64 {
    match mdc {
        codes::RESP_RATE => 16.0,
        codes::VENT_VOL_TIDAL => 450.0,
        codes::VENT_PRESS_AWAY_MAX => 22.5,
        codes::VENT_PRESS_AWAY_MEAN => 11.25,
        codes::VENT_PRESS_AWAY_END_EXP_POS => 5.0,
        codes::CONC_AWAY_O2_INSP => 40.0,
        codes::ECG_HEART_RATE | codes::PULS_OXIM_PULS_RATE => 72.0,
        codes::PULS_OXIM_SAT_O2 => 97.5,
        codes::PRESS_BLD_NONINV_SYS => 120.0,
        codes::PRESS_BLD_NONINV_DIA => 80.0,
        codes::PRESS_BLD_NONINV_MEAN => 93.0,
        codes::TEMP_BODY => 37.25,
        codes::MASS_BODY_ACTUAL => 72.5,
        _ => 1.0,
    }
}

/// The physical value of `p` at step `n`, or `None` when the scenario has
/// it unavailable.
pub fn scenario_value(s: Scenario, p: &Point, n: u64) -> Option<f64> {
    let base = nominal(p.metric.mdc);
    let k = n as f64;
    match s {
        Scenario::Stable => Some(base),
        Scenario::Deteriorating => Some(match p.metric.mdc {
            codes::RESP_RATE => (base + k).min(40.0),
            codes::ECG_HEART_RATE | codes::PULS_OXIM_PULS_RATE => (base + 2.0 * k).min(150.0),
            codes::PULS_OXIM_SAT_O2 => (base - 0.5 * k).max(80.0),
            codes::VENT_PRESS_AWAY_MAX => (base + 0.5 * k).min(40.0),
            _ => base,
        }),
        Scenario::SensorOff => {
            let off = n % 6 >= 3
                && matches!(
                    p.metric.mdc,
                    codes::PULS_OXIM_SAT_O2 | codes::PULS_OXIM_PULS_RATE | codes::ECG_HEART_RATE
                );
            if off { None } else { Some(base) }
        }
    }
}

/// Byte permutation from value order (big-endian, A first) to wire order:
/// wire[i] = value[PERM[i]].
fn perm(order: WordOrder, n: usize) -> &'static [usize] {
    match (order, n) {
        (WordOrder::ABCD, 4) => &[0, 1, 2, 3],
        (WordOrder::DCBA, 4) => &[3, 2, 1, 0],
        (WordOrder::BADC, 4) => &[1, 0, 3, 2],
        (WordOrder::CDAB, 4) => &[2, 3, 0, 1],
        (WordOrder::ABCD, _) => &[0, 1, 2, 3, 4, 5, 6, 7],
        (WordOrder::DCBA, _) => &[7, 6, 5, 4, 3, 2, 1, 0],
        (WordOrder::BADC, _) => &[1, 0, 3, 2, 5, 4, 7, 6],
        (WordOrder::CDAB, _) => &[6, 7, 4, 5, 2, 3, 0, 1],
    }
}

fn to_registers(be: &[u8], order: WordOrder) -> Vec<u16> {
    let wire: Vec<u8> = if be.len() == 2 {
        be.to_vec()
    } else {
        perm(order, be.len()).iter().map(|&i| be[i]).collect()
    };
    wire.chunks(2)
        .map(|c| (u16::from(c[0]) << 8) | u16::from(c[1]))
        .collect()
}

/// What a point holds after encoding: the register words (or bit) and the
/// physical value a reader should decode (`None`: a sentinel / NaN).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub words: Vec<u16>,
    pub expect: Option<f64>,
}

/// Encode `value` (physical; `None` = unavailable) for point `p`.
pub fn encode(p: &Point, value: Option<f64>) -> Encoded {
    let sentinel = p.invalid.first().copied();
    let int_raw = |v: f64| ((v - p.offset) / p.scale).round();
    match p.ty {
        ValueType::F32 | ValueType::F64 => {
            let bits: u64 = match (value, sentinel) {
                (Some(v), _) => {
                    let raw = (v - p.offset) / p.scale;
                    if p.ty == ValueType::F32 {
                        u64::from((raw as f32).to_bits())
                    } else {
                        raw.to_bits()
                    }
                }
                (None, Some(Sentinel::Int(i))) => i as u64,
                (None, Some(Sentinel::Float(f))) if p.ty == ValueType::F32 => {
                    u64::from((f as f32).to_bits())
                }
                (None, Some(Sentinel::Float(f))) => f.to_bits(),
                (None, None) if p.ty == ValueType::F32 => u64::from(f32::NAN.to_bits()),
                (None, None) => f64::NAN.to_bits(),
            };
            let (be, expect): (Vec<u8>, Option<f64>) = if p.ty == ValueType::F32 {
                let f = f32::from_bits(bits as u32);
                (
                    (bits as u32).to_be_bytes().to_vec(),
                    value.map(|_| f64::from(f) * p.scale + p.offset),
                )
            } else {
                let f = f64::from_bits(bits);
                (
                    bits.to_be_bytes().to_vec(),
                    value.map(|_| f * p.scale + p.offset),
                )
            };
            Encoded {
                words: to_registers(&be, p.order),
                expect,
            }
        }
        _ => {
            let (raw, expect) = match (value, sentinel) {
                (Some(v), _) => {
                    let r = int_raw(v);
                    (r as i64, Some(r * p.scale + p.offset))
                }
                (None, Some(Sentinel::Int(i))) => (i, None),
                // No integer sentinel: the device keeps showing its value.
                (None, _) => {
                    let r = int_raw(scenario_fallback(p));
                    (r as i64, Some(r * p.scale + p.offset))
                }
            };
            let be: Vec<u8> = match p.ty {
                ValueType::U32 | ValueType::I32 => (raw as u32).to_be_bytes().to_vec(),
                ValueType::Bit => vec![0, u8::from(raw != 0)],
                _ => (raw as u16).to_be_bytes().to_vec(),
            };
            Encoded {
                words: to_registers(&be, p.order),
                expect,
            }
        }
    }
}

fn scenario_fallback(p: &Point) -> f64 {
    nominal(p.metric.mdc)
}

/// Write every point's value of step `n` into the tables; returns the
/// expected values by label.
pub fn apply_step(
    points: &[Point],
    scenario: Scenario,
    n: u64,
    t: &mut Tables,
) -> Vec<(String, Option<f64>)> {
    let mut expect = Vec::with_capacity(points.len());
    for p in points {
        let e = encode(p, scenario_value(scenario, p, n));
        match (p.table, p.ty) {
            (Table::Coils, _) => {
                t.coils.insert(p.address, e.words[0] & 1 == 1);
            }
            (Table::Discrete, _) => {
                t.discrete.insert(p.address, e.words[0] & 1 == 1);
            }
            (table, ValueType::Bit) => {
                let regs = if table == Table::Holding {
                    &mut t.holding
                } else {
                    &mut t.input
                };
                let b = p.bit.unwrap_or(0);
                let r = regs.entry(p.address).or_insert(0);
                *r = (*r & !(1 << b)) | ((e.words[0] & 1) << b);
            }
            (table, _) => {
                let regs = if table == Table::Holding {
                    &mut t.holding
                } else {
                    &mut t.input
                };
                for (i, w) in e.words.iter().enumerate() {
                    regs.insert(p.address + i as u16, *w);
                }
            }
        }
        expect.push((p.label.clone(), e.expect));
    }
    expect
}

/// The Modbus service over the shared tables.
#[derive(Debug, Clone)]
struct Device {
    unit_id: u8,
    tables: Arc<Mutex<Tables>>,
    silent_at: Option<Instant>,
    strict: bool,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl Device {
    fn answer(&self, req: SlaveRequest<'_>) -> Answer {
        if req.slave != self.unit_id || self.silent_at.is_some_and(|t| Instant::now() >= t) {
            return Ok(None);
        }
        let t = self
            .tables
            .lock()
            .map_err(|_| ExceptionCode::ServerDeviceFailure)?;
        let range = |start: u16, n: u16, max: u16| -> Result<Vec<u16>, ExceptionCode> {
            if n == 0 || n > max || u32::from(start) + u32::from(n) > 65536 {
                return Err(ExceptionCode::IllegalDataValue);
            }
            Ok((start..=start + (n - 1)).collect())
        };
        let regs = |m: &BTreeMap<u16, u16>, a: Vec<u16>| -> Result<Vec<u16>, ExceptionCode> {
            a.into_iter()
                .map(|x| match m.get(&x) {
                    Some(v) => Ok(*v),
                    None if self.strict => Err(ExceptionCode::IllegalDataAddress),
                    None => Ok(0),
                })
                .collect()
        };
        let bits = |m: &BTreeMap<u16, bool>, a: Vec<u16>| -> Result<Vec<bool>, ExceptionCode> {
            a.into_iter()
                .map(|x| match m.get(&x) {
                    Some(v) => Ok(*v),
                    None if self.strict => Err(ExceptionCode::IllegalDataAddress),
                    None => Ok(false),
                })
                .collect()
        };
        Ok(Some(match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                Response::ReadHoldingRegisters(regs(&t.holding, range(a, n, 125)?)?)
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(regs(&t.input, range(a, n, 125)?)?)
            }
            Request::ReadCoils(a, n) => Response::ReadCoils(bits(&t.coils, range(a, n, 2000)?)?),
            Request::ReadDiscreteInputs(a, n) => {
                Response::ReadDiscreteInputs(bits(&t.discrete, range(a, n, 2000)?)?)
            }
            // Read-only device.
            _ => return Err(ExceptionCode::IllegalFunction),
        }))
    }
}

impl tokio_modbus::server::Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Answer>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.answer(req))
    }
}

fn fmt_value(v: Option<f64>) -> String {
    v.map_or_else(|| "none".to_string(), |v| format!("{v}"))
}

fn echo_line(n: u64, expect: &[(String, Option<f64>)], t: &Tables) -> String {
    let mut s = format!("step n={n}");
    for (l, v) in expect {
        s.push_str(&format!(" {l}={}", fmt_value(*v)));
    }
    let regs = |name: &str, m: &BTreeMap<u16, u16>| {
        if m.is_empty() {
            return String::new();
        }
        let items: Vec<String> = m.iter().map(|(a, v)| format!("{a}:{v}")).collect();
        format!(" {name}={}", items.join(","))
    };
    let bits = |name: &str, m: &BTreeMap<u16, bool>| {
        if m.is_empty() {
            return String::new();
        }
        let items: Vec<String> = m
            .iter()
            .map(|(a, v)| format!("{a}:{}", u8::from(*v)))
            .collect();
        format!(" {name}={}", items.join(","))
    };
    s.push_str(" |");
    s.push_str(&regs("holding", &t.holding));
    s.push_str(&regs("input", &t.input));
    s.push_str(&bits("coils", &t.coils));
    s.push_str(&bits("discrete", &t.discrete));
    s
}

pub async fn run(args: ModbusArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;

    let file = map::load_map_file(&args.map).map_err(|e| anyhow::anyhow!(e.0))?;
    let points =
        map::validate(&file.points, Duration::from_secs(1)).map_err(|e| anyhow::anyhow!(e.0))?;
    let tables = Arc::new(Mutex::new(Tables::default()));
    let start = Instant::now();
    let device = Device {
        unit_id: args.unit_id,
        tables: tables.clone(),
        silent_at: args
            .go_silent_after_s
            .map(|s| start + Duration::from_secs_f64(s.max(0.0))),
        strict: args.strict_addresses,
    };
    let mut stdout = tokio::io::stdout();
    // Step 0 before serving, so the first read sees values.
    let step = |n: u64| -> String {
        let mut t = tables.lock().expect("tables");
        let expect = apply_step(&points, args.scenario, n, &mut t);
        echo_line(n, &expect, &t)
    };
    let first = step(0);

    let server = if let Some(listen) = &args.listen {
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("--listen {listen:?} is not ip:port"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        stdout
            .write_all(format!("listening {bound}\n").as_bytes())
            .await?;
        stdout.flush().await?;
        tracing::info!(%bound, unit_id = args.unit_id, "modbus tcp sim ready");
        let dev = device.clone();
        tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let new_service = move |_a: SocketAddr| Ok(Some(dev.clone()));
            let on_connected = move |stream, a| {
                let ns = new_service.clone();
                async move { tokio_modbus::server::tcp::accept_tcp_connection(stream, a, ns) }
            };
            let on_error = |e: std::io::Error| tracing::warn!(error = %e, "modbus tcp connection");
            if let Err(e) = server.serve(&on_connected, on_error).await {
                tracing::error!(error = %e, "modbus tcp server");
            }
        })
    } else {
        let path = args.port.clone().unwrap_or_default();
        let baud = args.baud_rate;
        let dev = device.clone();
        stdout
            .write_all(format!("serving {path}\n").as_bytes())
            .await?;
        stdout.flush().await?;
        tracing::info!(port = %path, unit_id = args.unit_id, "modbus rtu sim ready");
        tokio::spawn(async move {
            loop {
                let port = device_drivers::modbus::SERIAL
                    .with(&device_drivers::SerialOverrides {
                        baud_rate: Some(baud),
                        ..Default::default()
                    })
                    .open(&path);
                match port {
                    Ok(p) => {
                        let server = tokio_modbus::server::rtu::Server::new(p);
                        // A garbled frame ends tokio-modbus's RTU loop: log
                        // and serve again on a fresh handle.
                        if let Err(e) = server.serve_forever(dev.clone()).await {
                            tracing::warn!(error = %e, "modbus rtu frame; restarting");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, port = %path, "opening serial port"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    if args.echo {
        stdout.write_all(format!("{first}\n").as_bytes()).await?;
        stdout.flush().await?;
    }
    let mut n = 0u64;
    let mut tick = tokio::time::interval_at(
        start + Duration::from_millis(args.step_ms),
        Duration::from_millis(args.step_ms.max(10)),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let line = step(n);
                if args.echo {
                    stdout.write_all(format!("{line}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
        if server.is_finished() {
            anyhow::bail!("modbus server stopped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(text: &str) -> Vec<Point> {
        map::validate(
            &map::parse_map(text).unwrap().points,
            Duration::from_secs(1),
        )
        .unwrap()
    }

    #[test]
    fn encodes_f32_orders_from_its_own_tables() {
        // 40.5 = 0x42220000.
        for (o, want) in [
            ("ABCD", [0x4222, 0x0000]),
            ("CDAB", [0x0000, 0x4222]),
            ("BADC", [0x2242, 0x0000]),
            ("DCBA", [0x0000, 0x2242]),
        ] {
            let p = &pts(&format!(
                "[[points]]\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\norder = \"{o}\"\nunit = \"%\"\nmdc = \"MDC_CONC_AWAY_O2_INSP\"\n"
            ))[0];
            let e = encode(p, Some(40.5));
            assert_eq!(e.words, want, "{o}");
            assert_eq!(e.expect, Some(40.5));
        }
    }

    #[test]
    fn unavailable_values_use_the_first_sentinel() {
        let p = &pts(
            "[[points]]\ntable = \"input\"\naddress = 0\ntype = \"u16\"\nscale = 0.1\nunit = \"%\"\nmdc = \"MDC_PULS_OXIM_SAT_O2\"\ninvalid = [0xFFFF]\n",
        )[0];
        assert_eq!(encode(p, None).words, [0xFFFF]);
        let e = encode(p, Some(97.5));
        assert_eq!(e.words, [975]);
        assert!((e.expect.unwrap() - 97.5).abs() < 1e-9);
    }
}
