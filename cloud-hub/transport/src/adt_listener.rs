//! The HL7 v2 ADT listener (`[adt]`, off unless configured): MLLP over
//! TCP, TLS (rustls, ring provider), on `adt.listen`.
//!
//! ADT moves patients and their stored readings, so only configured
//! senders are applied: mutual TLS (`client_ca_file`: a connection without
//! a certificate from that CA fails the handshake; required off loopback)
//! and/or, on a loopback listen only, `allow_sources`; and MSH-4 must be in
//! `allowed_sending_facilities`. Other messages are answered AR, counted by
//! reason (`vigil_hub_adt_refused_total`) and change nothing. Every applied
//! event is written to the audit log with its source
//! (`adt:FACILITY@cert:FINGERPRINT` or `adt:FACILITY@ip:ADDRESS`), its
//! patient and every patient whose readings it moved, with the counts.
//!
//! For each message: [`crate::adt::interpret`] (sans-IO) → the event is
//! applied to the association store in one transaction (admit, transfer,
//! discharge, identifier/location update; stored readings re-attributed) →
//! only then the ACK says AA. Refused messages change nothing (AE/AR; see
//! `adt` for the rules). Messages of one connection are handled in order.
//!
//! Lenient where ADT feeds need it (the hub may start after the patient's
//! admission was sent): an A02 for a patient without a stay admits them to
//! the new bed; an A03 for a patient without a stay is acknowledged AA with
//! nothing to close; an A08 for a patient without a stay changes nothing.
//!
//! Limits: `max_connections` (more are closed at once), `max_message_bytes`
//! (larger messages are dropped and answered AR), 64 KiB of unframed input
//! per connection, `idle_timeout_s` of silence. Logs and counters carry
//! trigger events, bed ids, ACK codes and error locations, never patient
//! identifiers or names. The TCP/TLS server, framing and limits are the
//! agent's too ([`vigil_io::mllp`]); this module is its
//! [`Handler`](vigil_io::mllp::Handler).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use shared_protocol::hl7v2::{AckCode, AckError, AckTarget, DEFAULT_MAX_MESSAGE, MllpError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use vigil_io::mllp::{self, Counters, Event, Peer};
use vigil_io::tls::{self, ClientAuth, Identity, PemFile};

use crate::adt::{
    AdtEvent, AdtOptions, Interpreted, Outcome, ack, ack_error, allowed_facility, interpret,
};
use crate::association::{AssocError, Change};
use crate::config_error::ConfigError;
use crate::store::{Associations, Store, now_us};
use hub_domain::association::{AuditContext, Subject, audit_entries};
use hub_domain::clock::format_instant;

/// The port `[adt] listen` suggests (2575 is HL7's registered port; the
/// hub's default keeps it free for a co-located agent).
pub const DEFAULT_ADT_LISTEN: &str = "127.0.0.1:2576";
/// Unframed input a connection may send before it is closed.
const MAX_JUNK_BYTES: usize = 64 * 1024;

/// `[adt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdtConfig {
    /// `ip:port` to listen on, e.g. `127.0.0.1:2576`.
    pub listen: String,
    /// PEM certificate chain: serve MLLP over TLS.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (mode 0600) for `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// PEM file of the CA(s) that issue the ADT senders' client
    /// certificates: mutual TLS, a connection without a certificate that
    /// verifies is refused in the handshake. Required off loopback (needs
    /// `tls_cert_file`/`tls_key_file`).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Source IP addresses whose messages are applied, only when `listen`
    /// is a loopback address (e.g. an interface engine on the same host):
    /// a message from any other address is refused (AR). With
    /// `client_ca_file` too, both must hold.
    #[serde(default)]
    pub allow_sources: Vec<String>,
    /// MSH-4 sending facilities whose messages are applied (the whole
    /// field, its namespace id or its universal id); at least one.
    #[serde(default)]
    pub allowed_sending_facilities: Vec<String>,
    /// No longer permitted (`true` is refused): an ADT listener off
    /// loopback needs mutual TLS (`client_ca_file`).
    #[serde(default)]
    pub allow_plaintext: bool,
    /// `Identifier.system` when PID-3 has no assigning authority and the
    /// sending facility has no `[identifiers.facilities]` entry (mapped
    /// like an authority: `[identifiers]`).
    #[serde(default)]
    pub patient_id_system: Option<String>,
    /// Offset from UTC (minutes, ±1080) of HL7 times without a zone.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// PV1-3 → bed id template (`{poc}`, `{room}`, `{bed}`, `{facility}`).
    #[serde(default = "default_bed_id")]
    pub bed_id: String,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
}

fn default_bed_id() -> String {
    crate::adt::DEFAULT_BED_TEMPLATE.into()
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE
}
fn default_max_connections() -> usize {
    16
}
fn default_idle_timeout_s() -> u64 {
    300
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: format!("adt.{field}"),
        message: message.into(),
    }
}

impl AdtConfig {
    /// The parsed `listen` address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| invalid("listen", format!("`{}` is not ip:port: {e}", self.listen)))
    }

    /// Checks every field; errors name it (`adt.<field>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let addr = self.listen_addr()?;
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "tls_cert_file",
                "tls_cert_file and tls_key_file must be given together",
            ));
        }
        if self.allow_plaintext {
            return Err(invalid(
                "allow_plaintext",
                "plaintext ADT off loopback is no longer accepted: patient movements need an \
                 authenticated source; set client_ca_file (mutual TLS) and remove allow_plaintext",
            ));
        }
        if self.client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(invalid(
                "client_ca_file",
                "client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file",
            ));
        }
        self.sources()?;
        if self.client_ca_file.is_none() && !addr.ip().is_loopback() {
            if !self.allow_sources.is_empty() {
                return Err(invalid(
                    "allow_sources",
                    format!(
                        "{addr} is not a loopback address: allow_sources is accepted only on a \
                         loopback listen; off loopback set client_ca_file (mutual TLS)"
                    ),
                ));
            }
            return Err(invalid(
                "client_ca_file",
                format!(
                    "{addr} is not a loopback address: an ADT listener off loopback needs mutual \
                     TLS: set client_ca_file with tls_cert_file/tls_key_file"
                ),
            ));
        }
        if self.client_ca_file.is_none() && self.allow_sources.is_empty() {
            return Err(invalid(
                "allow_sources",
                "ADT messages move patients: name their senders, by client_ca_file (mutual TLS) \
                 or, on a loopback listen, allow_sources = [\"127.0.0.1\"]",
            ));
        }
        if self.allowed_sending_facilities.is_empty() {
            return Err(invalid(
                "allowed_sending_facilities",
                "name at least one MSH-4 sending facility whose messages are applied",
            ));
        }
        if self
            .allowed_sending_facilities
            .iter()
            .any(|f| f.trim().is_empty() || f.len() > 180 || f.chars().any(char::is_control))
        {
            return Err(invalid(
                "allowed_sending_facilities",
                "each entry must be 1-180 characters without control characters",
            ));
        }
        if !(-1080..=1080).contains(&self.utc_offset_minutes) {
            return Err(invalid(
                "utc_offset_minutes",
                "must be between -1080 and 1080",
            ));
        }
        crate::adt::check_bed_template(&self.bed_id).map_err(|m| invalid("bed_id", m))?;
        if self
            .patient_id_system
            .as_deref()
            .is_some_and(|s| s.trim().is_empty() || s.len() > 256)
        {
            return Err(invalid("patient_id_system", "must be 1-256 characters"));
        }
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if !(1..=1024).contains(&self.max_connections) {
            return Err(invalid("max_connections", "must be between 1 and 1024"));
        }
        if !(1..=86_400).contains(&self.idle_timeout_s) {
            return Err(invalid("idle_timeout_s", "must be between 1 and 86400"));
        }
        Ok(())
    }

    /// `allow_sources` parsed.
    fn sources(&self) -> Result<Vec<IpAddr>, ConfigError> {
        self.allow_sources
            .iter()
            .map(|a| {
                a.trim()
                    .parse()
                    .map_err(|_| invalid("allow_sources", format!("`{a}` is not an IP address")))
            })
            .collect()
    }

    /// Makes relative TLS paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [
            &mut self.tls_cert_file,
            &mut self.tls_key_file,
            &mut self.client_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn options(&self) -> AdtOptions {
        AdtOptions {
            patient_id_system: self.patient_id_system.clone(),
            identifiers: Default::default(),
            utc_offset_minutes: self.utc_offset_minutes,
            bed_template: self.bed_id.clone(),
        }
    }
}

/// Counters of the listener.
#[derive(Debug, Default)]
pub struct AdtStats {
    /// Connections accepted and refused, bytes dropped by the framer.
    pub listener: Counters,
    /// Messages answered AA.
    pub accepted: AtomicU64,
    /// Messages answered AE.
    pub errors: AtomicU64,
    /// Messages answered AR.
    pub rejected: AtomicU64,
    /// Readings re-attributed by ADT events.
    pub reattributed: AtomicU64,
    /// Messages refused (AR) because of their source: not an allowed
    /// address, or no verified client certificate.
    pub refused_source: AtomicU64,
    /// Messages refused (AR) because MSH-4 is not an allowed facility.
    pub refused_facility: AtomicU64,
    /// Applied events whose audit entries could not be written.
    pub audit_failures: AtomicU64,
}

impl AdtStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of these counters (served at `/metrics`).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let mut counter = |name: &str, help: &str, rows: &[(&str, &AtomicU64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {}", Self::get(v));
            }
        };
        counter(
            "vigil_hub_adt_messages_total",
            "HL7 ADT messages answered, by ACK code.",
            &[
                ("{ack=\"AA\"}", &self.accepted),
                ("{ack=\"AE\"}", &self.errors),
                ("{ack=\"AR\"}", &self.rejected),
            ],
        );
        counter(
            "vigil_hub_adt_connections_total",
            "HL7 ADT connections, accepted or refused (over max_connections).",
            &[
                ("{outcome=\"accepted\"}", &self.listener.connections),
                ("{outcome=\"refused\"}", &self.listener.connections_refused),
            ],
        );
        counter(
            "vigil_hub_adt_bytes_dropped_total",
            "Bytes dropped by the ADT MLLP framer (junk, truncated or oversized messages).",
            &[("", &self.listener.bytes_dropped)],
        );
        counter(
            "vigil_hub_adt_refused_total",
            "HL7 ADT messages refused (AR) before being applied, by reason.",
            &[
                ("{reason=\"untrusted_source\"}", &self.refused_source),
                ("{reason=\"facility\"}", &self.refused_facility),
            ],
        );
        counter(
            "vigil_hub_adt_readings_reattributed_total",
            "Stored readings re-attributed by ADT events.",
            &[("", &self.reattributed)],
        );
        counter(
            "vigil_hub_adt_audit_failures_total",
            "Applied ADT events whose audit log entries could not be written (applied, not audited).",
            &[("", &self.audit_failures)],
        );
    }
}

/// Errors starting the listener.
#[derive(Debug, thiserror::Error)]
pub enum AdtSetupError {
    #[error("adt.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("adt TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A bound ADT listener.
#[derive(Debug)]
pub struct AdtListener {
    server: mllp::Server,
    ctx: Arc<Ctx>,
}

#[derive(Debug)]
struct Ctx {
    opts: AdtOptions,
    /// Mutual TLS: every connection presented a verified certificate.
    client_auth: bool,
    /// Source addresses allowed (empty: any, with `client_auth`).
    sources: Vec<IpAddr>,
    facilities: Vec<String>,
    store: Store,
    fallback: Arc<Associations>,
    /// Links the audit entries of applied events (empty: unkeyed log).
    audit_keys: crate::audit::AuditKeys,
    stats: Arc<AdtStats>,
    acks: AtomicU64,
}

impl AdtListener {
    /// Validates `config`, loads TLS material and binds.
    pub async fn bind(
        config: &AdtConfig,
        store: Store,
        fallback: Arc<Associations>,
    ) -> Result<Self, AdtSetupError> {
        config.validate()?;
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(c), Some(k)) => Some(load_tls(c, k, config.client_ca_file.as_deref())?),
            _ => None,
        };
        let sources = config.sources()?;
        let addr = config.listen_addr()?;
        let limits = mllp::Limits {
            max_connections: config.max_connections,
            max_message_bytes: config.max_message_bytes,
            max_junk_bytes: MAX_JUNK_BYTES,
            idle_timeout: Duration::from_secs(config.idle_timeout_s),
            handshake_timeout: mllp::HANDSHAKE_TIMEOUT,
        };
        let server = mllp::Server::bind(addr, tls, limits)
            .await
            .map_err(|source| AdtSetupError::Bind { addr, source })?;
        Ok(Self {
            server,
            ctx: Arc::new(Ctx {
                opts: config.options(),
                client_auth: config.client_ca_file.is_some(),
                sources,
                audit_keys: crate::audit::AuditKeys::default(),
                facilities: config.allowed_sending_facilities.clone(),
                store,
                fallback,
                stats: Arc::default(),
                acks: AtomicU64::new(0),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    pub fn stats(&self) -> Arc<AdtStats> {
        self.ctx.stats.clone()
    }

    /// Maps PID-3 assigning authorities and MSH-4 sending facilities to
    /// identifier system URIs by `identifiers` (`[identifiers]`; default:
    /// its defaults).
    pub fn with_identifiers(
        mut self,
        identifiers: &hub_domain::identifiers::IdentifierSystems,
    ) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.opts.identifiers = identifiers.clone();
        }
        self
    }

    /// Counts into `stats` (e.g. the hub's `/metrics` counters) instead of
    /// the listener's own.
    /// The hub's audit keys, for the entries of applied events.
    pub fn with_audit_keys(mut self, keys: crate::audit::AuditKeys) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.audit_keys = keys;
        }
        self
    }

    pub fn with_stats(mut self, stats: Arc<AdtStats>) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.stats = stats;
        }
        self
    }

    /// Accepts connections until `shutdown` is cancelled, then lets open
    /// connections finish the message in hand.
    pub async fn serve(self, shutdown: CancellationToken) {
        self.server
            .serve_until(self.ctx, shutdown.cancelled_owned())
            .await
    }
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ServerConfig>, AdtSetupError> {
    let tls_err = |e: tls::TlsError| AdtSetupError::Tls(e.to_string());
    let identity = Identity::load(
        PemFile::new("adt.tls_cert_file", cert),
        PemFile::new("adt.tls_key_file", key),
    )
    .map_err(tls_err)?;
    let auth = match client_ca {
        Some(ca) => ClientAuth::Required(PemFile::new("adt.client_ca_file", ca)),
        None => ClientAuth::None,
    };
    let config = tls::server_config(identity, auth).map_err(tls_err)?;
    Ok(Arc::new(config))
}

/// The hub's part of the MLLP server: events applied to the association
/// store, the listener's logs and counters.
impl mllp::Handler for Ctx {
    async fn message(&self, peer: &Peer, message: Vec<u8>) -> Vec<u8> {
        self.handle(peer, message).await
    }

    fn oversized(&self, head: &[u8], max: usize) -> Vec<u8> {
        tracing::warn!(max, "ADT message too large; AR");
        let target = AckTarget::best_effort(head);
        let err = ack_error("MSH", 207, format!("message larger than {max} bytes"));
        self.answer(&target, AckCode::Reject, Some(&err))
    }

    fn counters(&self) -> &Counters {
        &self.stats.listener
    }

    fn event(&self, event: Event<'_>) {
        match event {
            Event::Ready { listen, tls } => {
                tracing::info!(listen = ?listen, tls, "HL7 ADT listener ready")
            }
            Event::AcceptFailed(e) => tracing::warn!(error = %e, "ADT accept failed"),
            Event::Refused { max } => {
                tracing::warn!(max, "too many ADT connections; closing the new one")
            }
            Event::Connected { peer } => tracing::debug!(peer = %peer.ip(), "ADT connection"),
            Event::HandshakeFailed(e) => tracing::warn!(error = %e, "ADT TLS handshake failed"),
            Event::HandshakeTimedOut => tracing::warn!("ADT TLS handshake timed out"),
            // An oversized message is logged where it is answered (AR).
            Event::Unframed(e) if !matches!(e, MllpError::Oversized { .. }) => {
                tracing::debug!(dropped = e.dropped(), "MLLP resync")
            }
            Event::TooMuchJunk { junk } => {
                tracing::warn!(junk, "too much unframed ADT input; closing the connection")
            }
            Event::Idle => tracing::debug!("ADT connection idle; closing"),
            Event::Stopped => {
                let s = &self.stats;
                tracing::info!(
                    connections = Counters::get(&s.listener.connections),
                    accepted = AdtStats::get(&s.accepted),
                    errors = AdtStats::get(&s.errors),
                    rejected = AdtStats::get(&s.rejected),
                    reattributed = AdtStats::get(&s.reattributed),
                    bytes_dropped = Counters::get(&s.listener.bytes_dropped),
                    "HL7 ADT listener stopped"
                );
            }
            _ => {}
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Recorded; readings re-attributed (who from, who to, how many).
    Changed(Change),
    /// Nothing to change (already so, or nothing known to change).
    Nothing,
}

impl Applied {
    /// Readings re-attributed.
    pub fn reattributed(&self) -> u64 {
        match self {
            Applied::Changed(c) => c.reattributed,
            Applied::Nothing => 0,
        }
    }
}

/// Applies an ADT event to the association store (blocking). An error is
/// the AE to answer.
pub fn apply(store: &Store, ev: &AdtEvent, fb: &Associations) -> Result<Applied, AckError> {
    let changed = Applied::Changed;
    let r = match ev {
        AdtEvent::Admit {
            patient,
            bed,
            at,
            visit,
        } => store
            .admit(patient, bed, *at, visit.as_deref(), fb)
            .map(changed),
        AdtEvent::Transfer {
            patient,
            bed,
            at,
            visit,
        } => match store.transfer(patient, bed, *at, fb) {
            Err(AssocError::NotAdmitted) => store
                .admit(patient, bed, *at, visit.as_deref(), fb)
                .map(changed),
            r => r.map(changed),
        },
        AdtEvent::Discharge { patient, at, .. } => match store.discharge(patient, *at, fb) {
            Err(AssocError::NotAdmitted) => Ok(Applied::Nothing),
            r => r.map(changed),
        },
        AdtEvent::Update {
            patient,
            bed,
            at,
            visit,
        } => (|| {
            let mut n = Change::default();
            if let Some(v) = visit
                && let Some(old) = store.stay_of_visit(v, *at)?
                && &old != patient
            {
                n.merge(store.change_identifier(&old, patient, v, fb)?);
            }
            if let Some(bed) = bed
                && store.bed_of(patient, *at)?.is_some_and(|b| &b != bed)
            {
                n.merge(store.transfer(patient, bed, *at, fb)?);
            }
            Ok(Applied::Changed(n))
        })(),
    };
    r.map_err(|e| match e {
        AssocError::BedNotFound(_) => ack_error("PV1^1^3", 103, "PV1-3 names no known bed"),
        AssocError::Invalid { field, .. } => ack_error("PID^1^3", 102, format!("invalid {field}")),
        AssocError::Store(err) => {
            tracing::error!(error = %err, "ADT event not stored");
            ack_error(
                "MSH",
                207,
                "temporarily unable to store the event; resend later",
            )
        }
        other => ack_error("PV1^1^3", 207, other.to_string()),
    })
}

impl Ctx {
    /// Writes the audit entries of an applied event: its patient and every
    /// patient whose readings it moved, with the counts. A failure is
    /// logged and counted; the event stays applied (it is committed).
    async fn audit(&self, actor: &str, ev: &AdtEvent, applied: &Applied) {
        let (patient, what) = match ev {
            AdtEvent::Admit {
                patient, bed, at, ..
            } => (
                patient,
                format!("ADT A01 admit to bed {bed} at {}", format_instant(*at)),
            ),
            AdtEvent::Transfer {
                patient, bed, at, ..
            } => (
                patient,
                format!("ADT A02 transfer to bed {bed} at {}", format_instant(*at)),
            ),
            AdtEvent::Discharge { patient, at, .. } => (
                patient,
                format!("ADT A03 discharge at {}", format_instant(*at)),
            ),
            AdtEvent::Update { patient, at, .. } => (
                patient,
                format!("ADT A08 update at {}", format_instant(*at)),
            ),
        };
        let nothing = Change::default();
        let change = match applied {
            Applied::Changed(c) => c,
            Applied::Nothing => &nothing,
        };
        let named = [Subject {
            system: Some(patient.system.clone()).filter(|s| !s.is_empty()),
            value: patient.value.clone(),
        }];
        let resource = format!("hl7:ADT^{}", ev.trigger());
        let ctx = AuditContext {
            time_us: now_us(),
            actor,
            resource: &resource,
            outcome: 200,
            what: &what,
            reason: None,
        };
        let entries = audit_entries(&ctx, &named, change);
        if let Err(e) = crate::audit::append_all(&self.store, &self.audit_keys, entries).await {
            AdtStats::add(&self.stats.audit_failures, 1);
            tracing::error!(error = %e, "writing the ADT audit entries failed");
        }
    }

    fn answer(&self, target: &AckTarget, code: AckCode, err: Option<&AckError>) -> Vec<u8> {
        match code {
            AckCode::Accept => AdtStats::add(&self.stats.accepted, 1),
            AckCode::Error => AdtStats::add(&self.stats.errors, 1),
            AckCode::Reject => AdtStats::add(&self.stats.rejected, 1),
        }
        let now = OffsetDateTime::now_utc();
        let n = self.acks.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}{:04x}", now_us(), n & 0xffff);
        ack(target, code, err, now, &id)
    }

    /// Who sent the message, as the audit log names it, or None when the
    /// source is not trusted: without a verified client certificate under
    /// mutual TLS, or from an address `allow_sources` does not list.
    fn source(&self, peer: &Peer) -> Option<String> {
        let by_cert = match (&peer.client_certificate, self.client_auth) {
            (Some(der), true) => {
                let d = ring::digest::digest(&ring::digest::SHA256, der);
                Some(format!("cert:{}", &hex::encode(d)[..16]))
            }
            (None, true) => return None,
            (_, false) => None,
        };
        if !self.sources.is_empty() && !self.sources.contains(&peer.addr.ip()) {
            return None;
        }
        if by_cert.is_none() && self.sources.is_empty() {
            return None;
        }
        Some(by_cert.unwrap_or_else(|| format!("ip:{}", peer.addr.ip())))
    }

    /// Interpret, check the source and facility, apply, audit, answer.
    async fn handle(&self, peer: &Peer, bytes: Vec<u8>) -> Vec<u8> {
        let Interpreted { target, outcome } = interpret(&bytes, &self.opts, now_us());
        drop(bytes);
        let Some(source) = self.source(peer) else {
            AdtStats::add(&self.stats.refused_source, 1);
            tracing::warn!(peer = %peer.addr.ip(), "ADT message from an untrusted source refused (AR)");
            let e = ack_error(
                "MSH",
                207,
                "untrusted source: messages are accepted only from the configured senders",
            );
            return self.answer(&target, AckCode::Reject, Some(&e));
        };
        if let Outcome::Reject(e) = &outcome {
            tracing::warn!(location = %e.location, code = e.code, "ADT message rejected (AR)");
            return self.answer(&target, AckCode::Reject, Some(e));
        }
        let delimiter = target.delimiters.component;
        let Some(facility) =
            allowed_facility(&target.sending_facility, delimiter, &self.facilities)
        else {
            AdtStats::add(&self.stats.refused_facility, 1);
            tracing::warn!(source = %source, "ADT message from a sending facility not allowed refused (AR)");
            let e = ack_error("MSH^1^4", 103, "sending facility (MSH-4) not allowed");
            return self.answer(&target, AckCode::Reject, Some(&e));
        };
        let actor = format!("adt:{facility}@{source}");
        match outcome {
            Outcome::Reject(e) => self.answer(&target, AckCode::Reject, Some(&e)),
            Outcome::Error(e) => {
                tracing::warn!(location = %e.location, code = e.code, "ADT message refused (AE)");
                self.answer(&target, AckCode::Error, Some(&e))
            }
            Outcome::Event(ev) => {
                let (store, fallback) = (self.store.clone(), self.fallback.clone());
                let trigger = ev.trigger();
                let event = ev.clone();
                let bed = match &ev {
                    AdtEvent::Admit { bed, .. } | AdtEvent::Transfer { bed, .. } => {
                        Some(bed.clone())
                    }
                    AdtEvent::Update { bed, .. } => bed.clone(),
                    AdtEvent::Discharge { .. } => None,
                };
                let r = tokio::task::spawn_blocking(move || apply(&store, &ev, &fallback))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "ADT task failed");
                        Err(ack_error("MSH", 207, "internal error; resend later"))
                    });
                match r {
                    Ok(applied) => {
                        let n = applied.reattributed();
                        AdtStats::add(&self.stats.reattributed, n);
                        tracing::info!(trigger, bed_id = ?bed, reattributed = n, nothing = applied == Applied::Nothing,
                            "ADT event applied");
                        self.audit(&actor, &event, &applied).await;
                        self.answer(&target, AckCode::Accept, None)
                    }
                    Err(e) => {
                        tracing::warn!(trigger, bed_id = ?bed, location = %e.location, code = e.code,
                            "ADT event refused (AE)");
                        self.answer(&target, AckCode::Error, Some(&e))
                    }
                }
            }
        }
    }
}
