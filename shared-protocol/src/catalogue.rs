//! The metric catalogue: one table mapping IEEE 11073-10101 (MDC) codes to
//! LOINC, UCUM and display names. Used by drivers (to label what they decode)
//! and by the hub (to build FHIR codings). Only the hub turns this into FHIR.
//!
//! Sources for the codes in the table:
//! - MDC codes: IEEE 11073-10101:2019 "Nomenclature" (and the same values in
//!   IEEE 11073-10101a and the Rosetta Terminology Mapping, NIST RTMMS).
//!   A 32-bit MDC code is `partition << 16 | term`; partition 2 = SCADA
//!   (physiological), partition 4 = DIM (units).
//! - LOINC codes: LOINC database (Regenstrief), and for the vital signs the
//!   FHIR R4 vital-signs profile (hl7.org/fhir/R4/observation-vitalsigns.html),
//!   which names 8867-4, 9279-1, 2708-6/59408-5, 8310-5, 8480-6, 8462-4,
//!   8478-0 (mean BP), 29463-7, 85354-9 (BP panel).
//! - UCUM units: the vital-signs profile's required units and ucum.org.

/// A unit of measure, with its MDC code and UCUM code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// IEEE 11073-10101 unit code (partition 4).
    pub mdc: u32,
    pub mdc_name: &'static str,
    /// UCUM code, as used in FHIR `Quantity.code`.
    pub ucum: &'static str,
    /// Human-readable unit, as used in FHIR `Quantity.unit`.
    pub display: &'static str,
}

/// A metric the system knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// IEEE 11073-10101 code (partition << 16 | term).
    pub mdc: u32,
    pub mdc_name: &'static str,
    /// LOINC code used as the Observation's primary code.
    pub loinc: &'static str,
    pub loinc_display: &'static str,
    /// Additional LOINC code the FHIR vital-signs profile requires alongside
    /// (e.g. 2708-6 for pulse-oximetry SpO2), if any.
    pub loinc_profile: Option<&'static str>,
    /// Short display name for clinicians.
    pub display: &'static str,
    /// The canonical unit.
    pub unit: Unit,
    /// Physiologically possible range in the canonical unit. Values outside
    /// are physically impossible (not merely abnormal); the hub flags them.
    pub possible_range: (f64, f64),
    /// Other units devices report this metric in. Values are never
    /// converted: a reading keeps its unit, and the variant says which LOINC
    /// code and possible range go with it.
    pub alt_units: &'static [AltUnit],
}

/// A unit a metric may also be reported in, with the LOINC code that names
/// the metric in that unit (LOINC codes carry the property: partial pressure
/// and volume fraction are different codes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AltUnit {
    pub unit: Unit,
    pub loinc: &'static str,
    pub loinc_display: &'static str,
    /// Physically possible range in this unit.
    pub possible_range: (f64, f64),
}

impl Metric {
    /// This metric as reported in the given unit (MDC unit code and/or UCUM
    /// code; a zero/empty one is "not given"): the canonical metric, or the
    /// variant for an alternative unit (its unit, LOINC code and range), or
    /// `None` when the unit is not one the metric is reported in.
    pub fn in_unit(&self, mdc_unit: u32, ucum: &str) -> Option<Metric> {
        if mdc_unit == 0 && ucum.is_empty() {
            return None;
        }
        let fits =
            |u: &Unit| (mdc_unit == 0 || mdc_unit == u.mdc) && (ucum.is_empty() || ucum == u.ucum);
        if fits(&self.unit) {
            return Some(*self);
        }
        self.alt_units
            .iter()
            .find(|a| fits(&a.unit))
            .map(|a| Metric {
                unit: a.unit,
                loinc: a.loinc,
                loinc_display: a.loinc_display,
                // A profile code belongs to the canonical LOINC term only.
                loinc_profile: None,
                possible_range: a.possible_range,
                ..*self
            })
    }

    /// Every (unit, LOINC) this metric is reported with, canonical first.
    pub fn variants(&self) -> impl Iterator<Item = Metric> + '_ {
        std::iter::once(*self).chain(
            self.alt_units
                .iter()
                .filter_map(|a| self.in_unit(a.unit.mdc, a.unit.ucum)),
        )
    }
}

const fn mdc(partition: u32, term: u32) -> u32 {
    (partition << 16) | term
}

pub mod units {
    //! Units used by the catalogue (IEEE 11073-10101 partition 4).
    use super::{Unit, mdc};

    pub const PERCENT: Unit = Unit {
        mdc: mdc(4, 544),
        mdc_name: "MDC_DIM_PERCENT",
        ucum: "%",
        display: "%",
    };
    pub const BEAT_PER_MIN: Unit = Unit {
        mdc: mdc(4, 2720),
        mdc_name: "MDC_DIM_BEAT_PER_MIN",
        ucum: "/min",
        display: "beats/minute",
    };
    pub const RESP_PER_MIN: Unit = Unit {
        mdc: mdc(4, 2784),
        mdc_name: "MDC_DIM_RESP_PER_MIN",
        ucum: "/min",
        display: "breaths/minute",
    };
    pub const DEGC: Unit = Unit {
        mdc: mdc(4, 6048),
        mdc_name: "MDC_DIM_DEGC",
        ucum: "Cel",
        display: "°C",
    };
    pub const MMHG: Unit = Unit {
        mdc: mdc(4, 3872),
        mdc_name: "MDC_DIM_MMHG",
        ucum: "mm[Hg]",
        display: "mmHg",
    };
    pub const KILO_G: Unit = Unit {
        mdc: mdc(4, 1731),
        mdc_name: "MDC_DIM_KILO_G",
        ucum: "kg",
        display: "kg",
    };
    pub const MILLI_G_PER_DL: Unit = Unit {
        mdc: mdc(4, 2130),
        mdc_name: "MDC_DIM_MILLI_G_PER_DL",
        ucum: "mg/dL",
        display: "mg/dL",
    };
    /// Millilitre: MDC_DIM_MILLI_L (4::1618 = litre 1600 + milli prefix 18;
    /// value 263762 as used by OpenICE/Rosetta-based code).
    pub const MILLI_L: Unit = Unit {
        mdc: mdc(4, 1618),
        mdc_name: "MDC_DIM_MILLI_L",
        ucum: "mL",
        display: "mL",
    };
    /// Hectopascal: MDC_DIM_HECTO_PASCAL (4::3842 = pascal 3840 + hecto
    /// prefix 2). 1 hPa = 1 mbar exactly, the unit Dräger MEDIBUS reports
    /// airway pressures in.
    pub const HECTO_PA: Unit = Unit {
        mdc: mdc(4, 3842),
        mdc_name: "MDC_DIM_HECTO_PASCAL",
        ucum: "hPa",
        display: "hPa (= mbar)",
    };

    /// All units the catalogue uses.
    /// Kilopascal: MDC_DIM_KILO_PASCAL (4::3843).
    pub const KILO_PA: Unit = Unit {
        mdc: mdc(4, 3843),
        mdc_name: "MDC_DIM_KILO_PASCAL",
        ucum: "kPa",
        display: "kPa",
    };
    /// Degree Fahrenheit: MDC_DIM_FAHR (4::4416).
    pub const DEGF: Unit = Unit {
        mdc: mdc(4, 4416),
        mdc_name: "MDC_DIM_FAHR",
        ucum: "[degF]",
        display: "°F",
    };

    /// Pound (avoirdupois): MDC_DIM_LB (4::1760 = 263904, the unit of the
    /// IEEE 11073-10415 weighing scale in imperial mode); UCUM `[lb_av]`.
    pub const LB: Unit = Unit {
        mdc: mdc(4, 1760),
        mdc_name: "MDC_DIM_LB",
        ucum: "[lb_av]",
        display: "lb",
    };
    /// Kilogram per litre: MDC_DIM_KILO_G_PER_L (4::2051 = MDC_DIM_X_G_PER_L
    /// 2048 + kilo prefix 3, the same base + prefix rule as KILO_PA and
    /// MILLI_L), the unit of the Bluetooth Glucose Measurement's kg/L flag.
    pub const KILO_G_PER_L: Unit = Unit {
        mdc: mdc(4, 2051),
        mdc_name: "MDC_DIM_KILO_G_PER_L",
        ucum: "kg/L",
        display: "kg/L",
    };
    /// Mole per litre: MDC_DIM_X_MOLE_PER_L (4::4704; MDC_DIM_MILLI_MOLE_PER_L
    /// is 4::4722 = 4704 + milli prefix 18), the unit of the Bluetooth
    /// Glucose Measurement's mol/L flag.
    pub const MOLE_PER_L: Unit = Unit {
        mdc: mdc(4, 4704),
        mdc_name: "MDC_DIM_X_MOLE_PER_L",
        ucum: "mol/L",
        display: "mol/L",
    };

    pub const ALL: &[Unit] = &[
        LB,
        KILO_G_PER_L,
        MOLE_PER_L,
        KILO_PA,
        DEGF,
        PERCENT,
        BEAT_PER_MIN,
        RESP_PER_MIN,
        DEGC,
        MMHG,
        KILO_G,
        MILLI_G_PER_DL,
        MILLI_L,
        HECTO_PA,
    ];
}

/// MDC codes of the catalogue's metrics, for drivers to name what they emit.
pub mod codes {
    use super::mdc;
    /// MDC_ECG_HEART_RATE (2::16770).
    pub const ECG_HEART_RATE: u32 = mdc(2, 16770);
    /// MDC_PULS_OXIM_PULS_RATE (2::18458).
    pub const PULS_OXIM_PULS_RATE: u32 = mdc(2, 18458);
    /// MDC_PULS_RATE_NON_INV (2::18474 = 149546): the pulse rate a
    /// non-invasive blood pressure monitor reports (IEEE 11073-10407).
    pub const PULS_RATE_NON_INV: u32 = mdc(2, 18474);
    /// MDC_RESP_RATE (2::20490).
    pub const RESP_RATE: u32 = mdc(2, 20490);
    /// MDC_PULS_OXIM_SAT_O2 (2::19384).
    pub const PULS_OXIM_SAT_O2: u32 = mdc(2, 19384);
    /// MDC_PULS_OXIM_PERF_REL (2::19376).
    pub const PULS_OXIM_PERF_REL: u32 = mdc(2, 19376);
    /// MDC_TEMP_BODY (2::19292).
    pub const TEMP_BODY: u32 = mdc(2, 19292);
    /// MDC_PRESS_BLD_NONINV_SYS (2::18949).
    pub const PRESS_BLD_NONINV_SYS: u32 = mdc(2, 18949);
    /// MDC_PRESS_BLD_NONINV_DIA (2::18950).
    pub const PRESS_BLD_NONINV_DIA: u32 = mdc(2, 18950);
    /// MDC_PRESS_BLD_NONINV_MEAN (2::18951).
    pub const PRESS_BLD_NONINV_MEAN: u32 = mdc(2, 18951);
    /// MDC_MASS_BODY_ACTUAL (2::57664).
    pub const MASS_BODY_ACTUAL: u32 = mdc(2, 57664);
    /// MDC_CONC_GLU_CAPILLARY_WHOLEBLOOD (2::29112).
    pub const CONC_GLU_CAPILLARY_WHOLEBLOOD: u32 = mdc(2, 29112);
    /// MDC_CONC_AWAY_CO2_ET (2::20636): end-tidal CO2, as partial pressure
    /// (mmHg, kPa) or volume fraction (%). This is the code IHE PCD profiles
    /// use for EtCO2. (MDC_AWAY_CO2_ET, 2::20656, is IntelliVue's
    /// NOM_AWAY_CO2_ET; its driver maps it here.)
    pub const CONC_AWAY_CO2_ET: u32 = mdc(2, 20636);
    /// MDC_VENT_VOL_TIDAL (2::20908 = 151980).
    pub const VENT_VOL_TIDAL: u32 = mdc(2, 20908);
    /// MDC_VENT_PRESS_AWAY_MAX (2::20901 = 151973), peak inspiratory pressure.
    pub const VENT_PRESS_AWAY_MAX: u32 = mdc(2, 20901);
    /// MDC_VENT_PRESS_AWAY_MEAN (2::20903 = 151975).
    pub const VENT_PRESS_AWAY_MEAN: u32 = mdc(2, 20903);
    /// MDC_VENT_PRESS_AWAY_END_EXP_POS (2::20904 = 151976), applied PEEP.
    pub const VENT_PRESS_AWAY_END_EXP_POS: u32 = mdc(2, 20904);
    /// MDC_CONC_AWAY_O2_INSP (2::21124 = 152196), inspired O2 (FiO2).
    pub const CONC_AWAY_O2_INSP: u32 = mdc(2, 21124);
}

use units::*;

/// The table. Each row: MDC code, LOINC (source: LOINC / FHIR vital-signs
/// profile), UCUM unit, and the physically possible range.
const METRICS: &[Metric] = &[
    Metric {
        mdc: codes::ECG_HEART_RATE,
        mdc_name: "MDC_ECG_HEART_RATE",
        loinc: "8867-4",
        loinc_display: "Heart rate",
        loinc_profile: None,
        display: "Heart rate (ECG)",
        unit: BEAT_PER_MIN,
        possible_range: (0.0, 350.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::PULS_OXIM_PULS_RATE,
        mdc_name: "MDC_PULS_OXIM_PULS_RATE",
        // LOINC 8889-8 "Heart rate by Pulse oximetry"; the vital-signs
        // profile's heart-rate code 8867-4 is added alongside.
        loinc: "8889-8",
        loinc_display: "Heart rate by Pulse oximetry",
        loinc_profile: Some("8867-4"),
        display: "Pulse rate (SpO2)",
        unit: BEAT_PER_MIN,
        possible_range: (0.0, 350.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::PULS_RATE_NON_INV,
        mdc_name: "MDC_PULS_RATE_NON_INV",
        // LOINC 8867-4 "Heart rate" (no method): the NIBP monitor's pulse
        // rate, as IEEE 11073-10407 BP monitors and PHD FHIR examples pair
        // 149546 with 8867-4.
        loinc: "8867-4",
        loinc_display: "Heart rate",
        loinc_profile: None,
        display: "Pulse rate (NIBP)",
        unit: BEAT_PER_MIN,
        possible_range: (0.0, 350.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::RESP_RATE,
        mdc_name: "MDC_RESP_RATE",
        loinc: "9279-1",
        loinc_display: "Respiratory rate",
        loinc_profile: None,
        display: "Respiratory rate",
        unit: RESP_PER_MIN,
        possible_range: (0.0, 150.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::PULS_OXIM_SAT_O2,
        mdc_name: "MDC_PULS_OXIM_SAT_O2",
        // LOINC 59408-5 "Oxygen saturation in Arterial blood by Pulse
        // oximetry"; the vital-signs profile requires 2708-6 alongside.
        loinc: "59408-5",
        loinc_display: "Oxygen saturation in Arterial blood by Pulse oximetry",
        loinc_profile: Some("2708-6"),
        display: "SpO2",
        unit: PERCENT,
        possible_range: (0.0, 100.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::PULS_OXIM_PERF_REL,
        mdc_name: "MDC_PULS_OXIM_PERF_REL",
        // LOINC 61006-3 "Perfusion index Tissue by Pulse oximetry".
        loinc: "61006-3",
        loinc_display: "Perfusion index Tissue by Pulse oximetry",
        loinc_profile: None,
        display: "Perfusion index",
        unit: PERCENT,
        possible_range: (0.0, 100.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::TEMP_BODY,
        mdc_name: "MDC_TEMP_BODY",
        loinc: "8310-5",
        loinc_display: "Body temperature",
        loinc_profile: None,
        display: "Body temperature",
        unit: DEGC,
        possible_range: (10.0, 46.0),
        alt_units: &[AltUnit {
            unit: DEGF,
            loinc: "8310-5",
            loinc_display: "Body temperature",
            possible_range: (50.0, 114.8),
        }],
    },
    Metric {
        mdc: codes::PRESS_BLD_NONINV_SYS,
        mdc_name: "MDC_PRESS_BLD_NONINV_SYS",
        loinc: "8480-6",
        loinc_display: "Systolic blood pressure",
        loinc_profile: None,
        display: "NIBP systolic",
        unit: MMHG,
        possible_range: (0.0, 350.0),
        alt_units: &[AltUnit {
            unit: KILO_PA,
            loinc: "8480-6",
            loinc_display: "Systolic blood pressure",
            possible_range: (0.0, 46.7),
        }],
    },
    Metric {
        mdc: codes::PRESS_BLD_NONINV_DIA,
        mdc_name: "MDC_PRESS_BLD_NONINV_DIA",
        loinc: "8462-4",
        loinc_display: "Diastolic blood pressure",
        loinc_profile: None,
        display: "NIBP diastolic",
        unit: MMHG,
        possible_range: (0.0, 300.0),
        alt_units: &[AltUnit {
            unit: KILO_PA,
            loinc: "8462-4",
            loinc_display: "Diastolic blood pressure",
            possible_range: (0.0, 40.0),
        }],
    },
    Metric {
        mdc: codes::PRESS_BLD_NONINV_MEAN,
        mdc_name: "MDC_PRESS_BLD_NONINV_MEAN",
        loinc: "8478-0",
        loinc_display: "Mean blood pressure",
        loinc_profile: None,
        display: "NIBP mean",
        unit: MMHG,
        possible_range: (0.0, 300.0),
        alt_units: &[AltUnit {
            unit: KILO_PA,
            loinc: "8478-0",
            loinc_display: "Mean blood pressure",
            possible_range: (0.0, 40.0),
        }],
    },
    Metric {
        mdc: codes::MASS_BODY_ACTUAL,
        mdc_name: "MDC_MASS_BODY_ACTUAL",
        loinc: "29463-7",
        loinc_display: "Body weight",
        loinc_profile: None,
        display: "Body weight",
        unit: KILO_G,
        possible_range: (0.0, 700.0),
        // LOINC 29463-7 has no unit restriction (property Mass): pounds
        // keep the same code (scales with an imperial unit flag).
        alt_units: &[AltUnit {
            unit: LB,
            loinc: "29463-7",
            loinc_display: "Body weight",
            possible_range: (0.0, 1543.0),
        }],
    },
    Metric {
        mdc: codes::CONC_GLU_CAPILLARY_WHOLEBLOOD,
        mdc_name: "MDC_CONC_GLU_CAPILLARY_WHOLEBLOOD",
        // LOINC 41653-7 "Glucose [Mass/volume] in Capillary blood by Glucometer".
        loinc: "41653-7",
        loinc_display: "Glucose [Mass/volume] in Capillary blood by Glucometer",
        loinc_profile: None,
        display: "Glucose (capillary)",
        unit: MILLI_G_PER_DL,
        possible_range: (0.0, 5000.0),
        alt_units: &[
            // kg/L is a mass concentration too: same LOINC term (property
            // MCnc). Bluetooth glucose meters report kg/L (95 mg/dL =
            // 0.00095 kg/L).
            AltUnit {
                unit: KILO_G_PER_L,
                loinc: "41653-7",
                loinc_display: "Glucose [Mass/volume] in Capillary blood by Glucometer",
                possible_range: (0.0, 0.05),
            },
            // Substance concentration: LOINC 14743-9 "Glucose [Moles/volume]
            // in Capillary blood by Glucometer" (property SCnc).
            AltUnit {
                unit: MOLE_PER_L,
                loinc: "14743-9",
                loinc_display: "Glucose [Moles/volume] in Capillary blood by Glucometer",
                possible_range: (0.0, 0.28),
            },
        ],
    },
    Metric {
        mdc: codes::CONC_AWAY_CO2_ET,
        mdc_name: "MDC_CONC_AWAY_CO2_ET",
        // LOINC 19891-1 "Carbon dioxide [Partial pressure] in Exhaled gas
        // --at end expiration".
        loinc: "19891-1",
        loinc_display: "Carbon dioxide [Partial pressure] in Exhaled gas --at end expiration",
        loinc_profile: None,
        display: "EtCO2",
        unit: MMHG,
        possible_range: (0.0, 150.0),
        alt_units: &[
            // Partial pressure in kPa: the same LOINC term (property PPres).
            AltUnit {
                unit: KILO_PA,
                loinc: "19891-1",
                loinc_display: "Carbon dioxide [Partial pressure] in Exhaled gas --at end expiration",
                possible_range: (0.0, 20.0),
            },
            // Volume fraction in %: LOINC 19888-7 "Carbon dioxide/Gas.total.at
            // end expiration in Exhaled gas by Infrared absorption" (property
            // VFr; capnometers measure by infrared absorption).
            AltUnit {
                unit: PERCENT,
                loinc: "19888-7",
                loinc_display: "Carbon dioxide/Gas.total.at end expiration in Exhaled gas by Infrared absorption",
                possible_range: (0.0, 20.0),
            },
        ],
    },
    // Ventilation rows (added with the Dräger MEDIBUS driver). MDC ↔ LOINC
    // pairs as used together by the German Medical Informatics Initiative
    // ICU module profiles (medizininformatik-initiative.de, modul-icu,
    // "Parameter von Beatmung") and the BIH-CEI T-CABS examples; MDC
    // reference ids as in IEEE 11073-10101 / NIST RTMMS. Pressures in hPa
    // (= mbar, the unit the ventilator reports; not converted to cm[H2O]).
    Metric {
        mdc: codes::VENT_VOL_TIDAL,
        mdc_name: "MDC_VENT_VOL_TIDAL",
        // LOINC 76222-9 (MII ICU profile "Atemzugvolumen während Beatmung").
        loinc: "76222-9",
        loinc_display: "Tidal volume --on ventilator",
        loinc_profile: None,
        display: "Tidal volume (ventilator)",
        unit: MILLI_L,
        possible_range: (0.0, 5000.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::VENT_PRESS_AWAY_MAX,
        mdc_name: "MDC_VENT_PRESS_AWAY_MAX",
        // LOINC 76531-3 (T-CABS/MII example pairing with 151973).
        loinc: "76531-3",
        loinc_display: "Pressure.max Respiratory system airway --on ventilator",
        loinc_profile: None,
        display: "Peak airway pressure",
        unit: HECTO_PA,
        possible_range: (-50.0, 200.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::VENT_PRESS_AWAY_MEAN,
        mdc_name: "MDC_VENT_PRESS_AWAY_MEAN",
        // LOINC 76530-5 (MII ICU profile "Mittlerer Beatmungsdruck").
        loinc: "76530-5",
        loinc_display: "Mean pressure Respiratory system airway --on ventilator",
        loinc_profile: None,
        display: "Mean airway pressure",
        unit: HECTO_PA,
        possible_range: (-50.0, 200.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::VENT_PRESS_AWAY_END_EXP_POS,
        mdc_name: "MDC_VENT_PRESS_AWAY_END_EXP_POS",
        // LOINC 76248-4 (T-CABS/MII PEEP example pairing with 151976).
        loinc: "76248-4",
        loinc_display: "PEEP Respiratory system --on ventilator",
        loinc_profile: None,
        display: "PEEP",
        unit: HECTO_PA,
        possible_range: (-50.0, 200.0),
        alt_units: &[],
    },
    Metric {
        mdc: codes::CONC_AWAY_O2_INSP,
        mdc_name: "MDC_CONC_AWAY_O2_INSP",
        // LOINC 3150-0 "Inhaled oxygen concentration".
        loinc: "3150-0",
        loinc_display: "Inhaled oxygen concentration",
        loinc_profile: None,
        display: "FiO2",
        unit: PERCENT,
        possible_range: (0.0, 100.0),
        alt_units: &[],
    },
];

/// Read-only access to the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct MetricCatalogue {
    metrics: &'static [Metric],
}

/// The catalogue shared by agent and hub.
pub const CATALOGUE: MetricCatalogue = MetricCatalogue { metrics: METRICS };

impl MetricCatalogue {
    pub fn all(&self) -> &'static [Metric] {
        self.metrics
    }

    pub fn by_mdc(&self, mdc: u32) -> Option<&'static Metric> {
        self.metrics.iter().find(|m| m.mdc == mdc)
    }

    /// Metrics whose primary or profile LOINC code is `loinc`.
    /// Metric variants (see [`Metric::in_unit`]) whose LOINC or profile
    /// LOINC is `loinc`. Several units may share one LOINC code.
    pub fn by_loinc<'a>(&self, loinc: &'a str) -> impl Iterator<Item = Metric> + 'a {
        self.metrics
            .iter()
            .flat_map(|m| m.variants())
            .filter(move |v| v.loinc == loinc || v.loinc_profile == Some(loinc))
    }

    /// A unit by its MDC code.
    pub fn unit_by_mdc(&self, mdc: u32) -> Option<Unit> {
        units::ALL.iter().copied().find(|u| u.mdc == mdc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn covers_the_required_vitals() {
        for code in [
            codes::ECG_HEART_RATE,
            codes::PULS_OXIM_PULS_RATE,
            codes::RESP_RATE,
            codes::PULS_OXIM_SAT_O2,
            codes::TEMP_BODY,
            codes::PRESS_BLD_NONINV_SYS,
            codes::PRESS_BLD_NONINV_DIA,
            codes::PRESS_BLD_NONINV_MEAN,
            codes::PULS_OXIM_PERF_REL,
            codes::MASS_BODY_ACTUAL,
            codes::CONC_GLU_CAPILLARY_WHOLEBLOOD,
            codes::CONC_AWAY_CO2_ET,
        ] {
            assert!(CATALOGUE.by_mdc(code).is_some(), "missing {code}");
        }
    }

    #[test]
    fn codes_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for m in CATALOGUE.all() {
            assert!(seen.insert(m.mdc), "duplicate MDC {}", m.mdc);
            assert_eq!(
                m.mdc >> 16,
                2,
                "{} is not in the SCADA partition",
                m.mdc_name
            );
            assert_eq!(
                m.unit.mdc >> 16,
                4,
                "{} unit not in the DIM partition",
                m.mdc_name
            );
            // LOINC codes are digits, a dash and a check digit.
            let (num, check) = m.loinc.split_once('-').expect("LOINC has a check digit");
            assert!(num.chars().all(|c| c.is_ascii_digit()) && check.len() == 1);
            assert!(m.possible_range.0 < m.possible_range.1);
        }
    }

    /// LOINC check digits use the Mod 10 algorithm (LOINC Users' Guide,
    /// "Calculating Mod 10 check digits"). A typo in a code fails here.
    #[test]
    fn loinc_check_digits_are_valid() {
        fn mod10(num: &str) -> u32 {
            // Double every other digit starting from the rightmost.
            let mut sum = 0;
            for (i, c) in num.chars().rev().enumerate() {
                let d = c.to_digit(10).unwrap();
                if i % 2 == 0 {
                    let dd = d * 2;
                    sum += dd / 10 + dd % 10;
                } else {
                    sum += d;
                }
            }
            (10 - sum % 10) % 10
        }
        for m in CATALOGUE.all() {
            for code in std::iter::once(m.loinc)
                .chain(m.loinc_profile)
                .chain(m.alt_units.iter().map(|a| a.loinc))
            {
                let (num, check) = code.split_once('-').unwrap();
                assert_eq!(
                    mod10(num).to_string(),
                    check,
                    "bad LOINC check digit in {code}"
                );
            }
        }
    }

    #[test]
    fn known_codes_have_their_published_values() {
        // IEEE 11073-10101 values, as decimal context-free codes.
        assert_eq!(codes::PULS_OXIM_SAT_O2, 150_456);
        assert_eq!(codes::ECG_HEART_RATE, 147_842);
        assert_eq!(codes::PULS_OXIM_PULS_RATE, 149_530);
        assert_eq!(codes::PRESS_BLD_NONINV_SYS, 150_021);
        assert_eq!(codes::TEMP_BODY, 150_364);
        assert_eq!(codes::PULS_OXIM_PERF_REL, 150_448);
        assert_eq!(units::PERCENT.mdc, 262_688);
        assert_eq!(units::BEAT_PER_MIN.mdc, 264_864);
        assert_eq!(units::MMHG.mdc, 266_016);
        assert_eq!(codes::PULS_RATE_NON_INV, 149_546);
        assert_eq!(units::LB.mdc, 263_904);
        assert_eq!(units::KILO_G_PER_L.mdc, 264_195);
    }

    #[test]
    fn bluetooth_units_resolve() {
        let w = CATALOGUE.by_mdc(codes::MASS_BODY_ACTUAL).unwrap();
        let lb = w.in_unit(units::LB.mdc, "[lb_av]").unwrap();
        assert_eq!((lb.loinc, lb.possible_range), ("29463-7", (0.0, 1543.0)));
        let g = CATALOGUE
            .by_mdc(codes::CONC_GLU_CAPILLARY_WHOLEBLOOD)
            .unwrap();
        assert_eq!(g.in_unit(0, "kg/L").unwrap().loinc, "41653-7");
        assert_eq!(g.in_unit(0, "mol/L").unwrap().loinc, "14743-9");
        assert!(g.in_unit(0, "mmol/L").is_none());
        let p = CATALOGUE.by_mdc(codes::PULS_RATE_NON_INV).unwrap();
        assert_eq!(p.in_unit(0, "/min").unwrap().loinc, "8867-4");
    }

    #[test]
    fn alternative_units_resolve_to_their_own_loinc_and_range() {
        let et = CATALOGUE.by_mdc(codes::CONC_AWAY_CO2_ET).unwrap();
        let mmhg = et.in_unit(units::MMHG.mdc, "mm[Hg]").unwrap();
        assert_eq!((mmhg.loinc, mmhg.unit.ucum), ("19891-1", "mm[Hg]"));
        let pct = et.in_unit(0, "%").unwrap();
        assert_eq!(
            (pct.loinc, pct.unit.mdc, pct.possible_range),
            ("19888-7", units::PERCENT.mdc, (0.0, 20.0))
        );
        let kpa = et.in_unit(units::KILO_PA.mdc, "").unwrap();
        assert_eq!(kpa.loinc, "19891-1");
        // Unit codes that disagree, an unknown unit, or none at all: refused.
        assert!(et.in_unit(units::MMHG.mdc, "%").is_none());
        assert!(et.in_unit(units::DEGC.mdc, "Cel").is_none());
        assert!(et.in_unit(0, "").is_none());
        // A profile code stays with the canonical term.
        let spo2 = CATALOGUE.by_mdc(codes::PULS_OXIM_SAT_O2).unwrap();
        assert_eq!(spo2.in_unit(0, "%").unwrap().loinc_profile, Some("2708-6"));
        let f = CATALOGUE
            .by_mdc(codes::TEMP_BODY)
            .unwrap()
            .in_unit(0, "[degF]")
            .unwrap();
        assert_eq!((f.loinc, f.unit.mdc), ("8310-5", 266_560));
        // Every alternative unit is a known unit, distinct from the canonical.
        for m in CATALOGUE.all() {
            for a in m.alt_units {
                assert_ne!(a.unit, m.unit);
                assert!(
                    CATALOGUE.unit_by_mdc(a.unit.mdc).is_some(),
                    "{}",
                    a.unit.mdc_name
                );
                assert!(a.possible_range.0 < a.possible_range.1);
            }
        }
    }

    #[test]
    fn lookup_by_loinc_includes_profile_codes() {
        let hr: Vec<_> = CATALOGUE.by_loinc("8867-4").map(|m| m.mdc).collect();
        assert!(hr.contains(&codes::ECG_HEART_RATE));
        assert!(hr.contains(&codes::PULS_OXIM_PULS_RATE));
        assert_eq!(
            CATALOGUE.by_loinc("2708-6").next().unwrap().mdc,
            codes::PULS_OXIM_SAT_O2
        );
    }
}
