//! Writing files so that a crash or a concurrent reader never sees half of one: a
//! temporary file in the same folder, fsync, rename over the target, fsync the folder.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

/// Mode of private keys (libpq refuses keys readable by others).
pub const KEY_FILE_MODE: u32 = 0o600;
/// Mode of certificates, profiles and client configuration files.
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode of `~/.postern` and the folders under it.
pub const DIR_MODE: u32 = 0o700;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 where it is new.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io(dir))
}

/// Replaces `path` with `contents` atomically, with `mode`. The temporary file is
/// created with `mode` already, so a key is never readable by others, even briefly.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.postern-tmp"));
    let result = (|| {
        let _ = fs::remove_file(&temp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(io(&temp))?;
        // The umask may have taken bits away; the mode asked for is what we want.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&temp))?;
        file.write_all(contents).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        drop(file);
        fs::rename(&temp, path).map_err(io(path))?;
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The file's text, or empty when it does not exist.
pub fn read_or_empty(path: &Path) -> Result<String, Error> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| Error::NotText {
            path: path.to_owned(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(Error::File {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes `path`; a file that is already gone is fine.
pub fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::File {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Keeps an existing file's mode when rewriting it (a user may have tightened it).
pub fn mode_or(path: &Path, default: u32) -> u32 {
    fs::metadata(path)
        .map(|meta| meta.permissions().mode() & 0o7777)
        .unwrap_or(default)
}
