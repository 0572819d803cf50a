//! Names interned to dense ids, so a pipeline's keys are small `Copy`
//! integers and its rows name each group once.

use rustc_hash::FxHashMap;

/// Names interned to ids `0, 1, 2...` in order of first sight. Only grows:
/// past `limit` names every new one takes the id of `overflow`, so a flood
/// of distinct names cannot grow the state without bound.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    names: Vec<Box<str>>,
    ids: FxHashMap<Box<str>, u32>,
    limit: usize,
    /// The name of every name past the limit, and of an id never given.
    overflow: &'static str,
}

impl Names {
    /// An empty table.
    pub(crate) fn new(limit: usize, overflow: &'static str) -> Self {
        Names {
            names: Vec::new(),
            ids: FxHashMap::default(),
            limit: limit.min(u32::MAX as usize),
            overflow,
        }
    }

    /// A table whose id 0 is `overflow`, which stands for unknown names.
    pub(crate) fn with_unknown(unknown: &'static str) -> Self {
        let mut names = Names::new(usize::MAX, unknown);
        names.intern(unknown);
        names
    }

    /// Rebuilds a table from its names in id order (as in a snapshot).
    pub(crate) fn from_names(
        names: impl IntoIterator<Item = impl Into<Box<str>>>,
        template: &Names,
    ) -> Result<Self, String> {
        let mut table = Names::new(template.limit, template.overflow);
        for name in names {
            let name = name.into();
            if table.ids.contains_key(&name) {
                return Err(format!("`{name}` appears twice"));
            }
            let id = u32::try_from(table.names.len()).map_err(|_| "too many names")?;
            table.ids.insert(name.clone(), id);
            table.names.push(name);
        }
        Ok(table)
    }

    /// The id of `name`, given now if it is new.
    #[inline]
    pub(crate) fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let name = if self.names.len() >= self.limit {
            self.overflow
        } else {
            name
        };
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// The name of `id` (the overflow name for an id never given).
    #[inline]
    pub(crate) fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or(self.overflow, |n| n)
    }

    /// The names in id order.
    pub(crate) fn names(&self) -> &[Box<str>] {
        &self.names
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_past_the_limit_share_the_overflow_id() {
        let mut names = Names::new(2, "other");
        assert_eq!(
            (names.intern("a"), names.intern("b"), names.intern("a")),
            (0, 1, 0)
        );
        assert_eq!(names.intern("c"), 2);
        assert_eq!(names.intern("d"), 2);
        assert_eq!(names.name(2), "other");
        assert_eq!(names.name(99), "other");
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn a_table_rebuilt_from_its_names_gives_the_same_ids() {
        let mut names = Names::with_unknown("unknown");
        for n in ["x", "y"] {
            names.intern(n);
        }
        let rebuilt = Names::from_names(names.names().to_vec(), &names).unwrap();
        assert_eq!(
            (rebuilt.name(0), rebuilt.name(1), rebuilt.name(2)),
            ("unknown", "x", "y")
        );
        assert!(Names::from_names(["x", "x"], &names).is_err());
    }
}
