//! PostgreSQL backend: shared by every replica of a production deployment.
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::*;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

sql_store!(PostgresStore, "postgres", sqlx::Postgres);
