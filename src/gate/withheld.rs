//! Fast-path calls answered without their result because their capture
//! could not be confirmed: the caller was told nothing was charged, so the
//! hold must be given back (released, or refunded if the capture landed
//! unseen). That is done in the background once the store is back; each
//! such call is also noted in a file of its own, in a directory beside the
//! receipt key, until it is done. The store was unreachable, so the note
//! cannot go there; a restart before the give-back lands finds the note and
//! gives the hold back then.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use super::{Gate, fast_path::give_back, recording};

/// The notes' directory.
#[derive(Debug, Clone)]
pub struct WithheldNotes {
    dir: PathBuf,
}

impl WithheldNotes {
    /// `withheld/` beside the receipt key: the server's own local data.
    pub fn beside(key_path: &Path) -> Self {
        let parent = key_path.parent().unwrap_or_else(|| Path::new("."));
        Self {
            dir: parent.join("withheld"),
        }
    }

    /// Notes a call, durably (the file and the directory entry are synced)
    /// before the caller is answered.
    pub fn note(&self, payment_id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut file = std::fs::File::create(self.dir.join(file_name(payment_id)?))?;
        file.write_all(payment_id.as_bytes())?;
        file.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The call's hold was given back.
    pub fn done(&self, payment_id: &str) {
        let Ok(name) = file_name(payment_id) else {
            return;
        };
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(payment_id, "cannot remove a withheld call's note: {e}"),
        }
    }

    /// The calls noted and not yet done.
    pub fn pending(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| file_name(name).is_ok())
            .collect()
    }
}

/// A payment id as a file name: only the characters tollgate's ids use.
fn file_name(payment_id: &str) -> std::io::Result<&str> {
    let plain = !payment_id.is_empty()
        && payment_id.len() <= 64
        && payment_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        Ok(payment_id)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a payment id: {payment_id:?}"),
        ))
    }
}

impl Gate {
    /// Notes a withheld call (see the module) and gives its hold back in
    /// the background.
    pub(super) fn withhold(&self, payment_id: &str) {
        if let Some(notes) = &self.withheld
            && let Err(e) = notes.note(payment_id)
        {
            tracing::error!(
                payment_id,
                "cannot note a withheld call; a restart before its hold is given back would leave it charged: {e}"
            );
        }
        self.give_back_in_background(payment_id.to_owned());
    }

    /// Gives back the holds of calls noted before this process started.
    pub fn resume_withheld(&self) {
        let Some(notes) = &self.withheld else {
            return;
        };
        for payment_id in notes.pending() {
            tracing::warn!(payment_id, "giving back a call withheld before a restart");
            self.give_back_in_background(payment_id);
        }
    }

    fn give_back_in_background(&self, payment_id: String) {
        let store = self.store.clone();
        let notes = self.withheld.clone();
        let id = payment_id.clone();
        recording::in_background(
            "giving back a withheld call's hold",
            payment_id,
            move || {
                let (store, notes, id) = (store.clone(), notes.clone(), id.clone());
                async move {
                    give_back(store, id.clone()).await?;
                    if let Some(notes) = notes {
                        notes.done(&id);
                    }
                    Ok(())
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_kept_until_done_and_only_for_payment_ids() {
        let dir = tempfile::tempdir().unwrap();
        let notes = WithheldNotes::beside(&dir.path().join("receipt.key"));
        assert!(notes.pending().is_empty(), "no directory yet");
        notes.note("pay_0123abc").unwrap();
        notes.note("pay_0456def").unwrap();
        let mut pending = notes.pending();
        pending.sort();
        assert_eq!(pending, ["pay_0123abc", "pay_0456def"]);
        notes.done("pay_0123abc");
        notes.done("pay_0123abc");
        assert_eq!(notes.pending(), ["pay_0456def"]);
        for odd in ["../escape", "pay/x", "", "pay.x"] {
            assert!(notes.note(odd).is_err(), "{odd}");
        }
        std::fs::write(dir.path().join("withheld").join("stray.tmp"), "x").unwrap();
        assert_eq!(
            notes.pending(),
            ["pay_0456def"],
            "a stray file is not a note"
        );
    }
}
