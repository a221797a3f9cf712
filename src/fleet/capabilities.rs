//! Agent capability bits and their names as the OpAMP proto spells them.

use std::fmt;

use crate::reconcile;

/// The `AgentCapabilities` bit set an agent reported (kept as sent; unknown
/// bits are kept but have no name).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(pub u64);

/// Every capability the proto defines, in bit order, with its proto name.
const NAMES: [(u64, &str); 16] = [
    (0x1, "ReportsStatus"),
    (0x2, "AcceptsRemoteConfig"),
    (0x4, "ReportsEffectiveConfig"),
    (0x8, "AcceptsPackages"),
    (0x10, "ReportsPackageStatuses"),
    (0x20, "ReportsOwnTraces"),
    (0x40, "ReportsOwnMetrics"),
    (0x80, "ReportsOwnLogs"),
    (0x100, "AcceptsOpAMPConnectionSettings"),
    (0x200, "AcceptsOtherConnectionSettings"),
    (0x400, "AcceptsRestartCommand"),
    (0x800, "ReportsHealth"),
    (0x1000, "ReportsRemoteConfig"),
    (0x2000, "ReportsHeartbeat"),
    (0x4000, "ReportsAvailableComponents"),
    (0x8000, "ReportsConnectionSettingsStatus"),
];

impl Capabilities {
    pub const ACCEPTS_REMOTE_CONFIG: u64 = 0x2;
    pub const REPORTS_EFFECTIVE_CONFIG: u64 = 0x4;
    pub const REPORTS_HEALTH: u64 = 0x800;
    pub const REPORTS_REMOTE_CONFIG: u64 = 0x1000;

    /// True when every bit of `bits` is set.
    pub fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }

    pub fn accepts_remote_config(self) -> bool {
        self.has(Self::ACCEPTS_REMOTE_CONFIG)
    }

    /// Why the controller cannot manage an agent's config, if it cannot (the
    /// planner's rule, [`reconcile::unsupported_reason`]).
    pub fn unsupported_reason(self) -> Option<&'static str> {
        reconcile::unsupported_reason(self.accepts_remote_config(), self.has(Self::REPORTS_REMOTE_CONFIG))
    }

    /// The bits of the given proto names (as [`Capabilities::names`] lists
    /// them); unknown names are ignored.
    pub fn from_names<'n>(names: impl IntoIterator<Item = &'n str>) -> Self {
        Capabilities(
            names
                .into_iter()
                .filter_map(|n| NAMES.iter().find(|(_, name)| *name == n).map(|(bit, _)| bit))
                .fold(0, |bits, bit| bits | bit),
        )
    }

    /// The names of the known bits that are set, in bit order.
    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capabilities({:#x} {:?})", self.0, self.names())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_bit_order_and_unknown_bits_ignored() {
        let c = Capabilities(0x1 | 0x2 | 0x1000 | 0x10_0000);
        assert_eq!(
            c.names(),
            ["ReportsStatus", "AcceptsRemoteConfig", "ReportsRemoteConfig"]
        );
        assert!(c.accepts_remote_config());
        assert!(!Capabilities(0x1).accepts_remote_config());
        assert!(Capabilities(0xffff).names().len() == 16);
    }

    #[test]
    fn names_back_to_bits() {
        for bits in [0x0, 0x1 | 0x2 | 0x1000, 0xffff] {
            assert_eq!(Capabilities::from_names(Capabilities(bits).names()), Capabilities(bits));
        }
        assert_eq!(
            Capabilities::from_names(["AcceptsRemoteConfig", "NoSuchCapability"]),
            Capabilities(0x2)
        );
    }
}
