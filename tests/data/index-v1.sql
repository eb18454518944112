-- An index database as dicomnode release 1 (before Alembic) created it, with synthetic rows (no PHI).
-- Made by tests/data/make_index_v1.py (sqlite3 iterdump); loaded by tests/test_migrations.py.
BEGIN TRANSACTION;
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	study_id INTEGER, 
	version_id INTEGER, 
	destination VARCHAR(128) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	path VARCHAR(255) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT NOT NULL, 
	claimed_until FLOAT, 
	claim_token VARCHAR(32), 
	last_status INTEGER, 
	last_error TEXT NOT NULL, 
	created_at FLOAT NOT NULL, 
	sent_at FLOAT, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_deliveries_destination_sop UNIQUE (destination, sop_instance_uid)
);
INSERT INTO "deliveries" VALUES(1,1,1,'PACS@10.0.0.5:104','2.25.100000000000000000000000000000000022','1.2.840.10008.5.1.4.1.1.88.22','1.2.840.10008.1.2.1','reports/2.25.100000000000000000000000000000000001/v1/sr.dcm','sent',1,1714000080.0,NULL,NULL,0,'',1714000080.0,1714000081.0);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	at FLOAT NOT NULL, 
	kind VARCHAR(64) NOT NULL, 
	study_id INTEGER, 
	version_id INTEGER, 
	message TEXT NOT NULL, 
	detail JSON NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "events" VALUES(1,1714000001.0,'version_opened',1,NULL,'study 1 version 1 receiving','{}');
INSERT INTO "events" VALUES(2,1714000002.0,'duplicate_instance',1,NULL,'duplicate SOP instance d498fda369 from MODALITY1@10.0.0.7; first copy kept','{"sop_instance_uid": "2.25.100000000000000000000000000000000101"}');
INSERT INTO "events" VALUES(3,1714000035.0,'version_complete',1,1,'study 1 version 1 complete (quiet_period); roles: FLAIR, T1','{"reason": "quiet_period", "roles": ["FLAIR", "T1"]}');
INSERT INTO "events" VALUES(4,1714000080.0,'delivery_queued',1,1,'study 1: 1 delivery(ies) queued for 1 destination(s)','{"deliveries": 1}');
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	gradable BOOLEAN NOT NULL, 
	path VARCHAR(255) NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	received_at FLOAT NOT NULL, 
	calling_ae VARCHAR(16), 
	peer_address VARCHAR(64), 
	duplicates INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_instance_uid), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	FOREIGN KEY(series_id) REFERENCES series (id), 
	UNIQUE (path)
);
INSERT INTO "instances" VALUES(1,'2.25.100000000000000000000000000000000101','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,1,1,1,'spool/store/2.25.100000000000000000000000000000000001/2.25.100000000000000000000000000000000011/0001.dcm',131073,1714000001.0,'MODALITY1','10.0.0.7',1);
INSERT INTO "instances" VALUES(2,'2.25.100000000000000000000000000000000102','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,1,1,1,'spool/store/2.25.100000000000000000000000000000000001/2.25.100000000000000000000000000000000011/0002.dcm',131074,1714000002.0,'MODALITY1','10.0.0.7',0);
INSERT INTO "instances" VALUES(3,'2.25.100000000000000000000000000000000103','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,2,1,1,'spool/store/2.25.100000000000000000000000000000000001/2.25.100000000000000000000000000000000012/0003.dcm',131075,1714000003.0,'MODALITY1','10.0.0.7',0);
INSERT INTO "instances" VALUES(4,'2.25.100000000000000000000000000000000104','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1',1,2,1,1,'spool/store/2.25.100000000000000000000000000000000001/2.25.100000000000000000000000000000000012/0004.dcm',131076,1714000004.0,'MODALITY1','10.0.0.7',0);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	stage VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	deliveries INTEGER NOT NULL, 
	error TEXT, 
	created_at FLOAT NOT NULL, 
	started_at FLOAT, 
	finished_at FLOAT, 
	seconds FLOAT, 
	sent_at FLOAT, 
	holder VARCHAR(128), 
	lease_until FLOAT, 
	detail JSON NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (version_id, stage), 
	FOREIGN KEY(version_id) REFERENCES study_versions (id)
);
INSERT INTO "jobs" VALUES(1,1,1,'convert','done',1,NULL,1714000045.0,1714000046.0,1714000054.0,8.0,1714000045.0,NULL,NULL,'{"stage": "convert"}');
INSERT INTO "jobs" VALUES(2,1,1,'preprocess','done',1,NULL,1714000055.0,1714000056.0,1714000064.0,8.0,1714000055.0,NULL,NULL,'{"stage": "preprocess"}');
INSERT INTO "jobs" VALUES(3,1,1,'infer','done',1,NULL,1714000065.0,1714000066.0,1714000074.0,8.0,1714000065.0,NULL,NULL,'{"stage": "infer"}');
INSERT INTO "jobs" VALUES(4,1,1,'report','done',1,NULL,1714000075.0,1714000076.0,1714000084.0,8.0,1714000075.0,NULL,NULL,'{"stage": "report"}');
INSERT INTO "jobs" VALUES(5,1,1,'dispatch','done',1,NULL,1714000085.0,1714000086.0,1714000094.0,8.0,1714000085.0,NULL,NULL,'{"stage": "dispatch"}');
CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE own_objects (
	sop_instance_uid VARCHAR(64) NOT NULL, 
	version_id INTEGER, 
	created_at FLOAT NOT NULL, 
	returned INTEGER NOT NULL, 
	PRIMARY KEY (sop_instance_uid)
);
INSERT INTO "own_objects" VALUES('2.25.100000000000000000000000000000000022',1,1714000079.0,0);
CREATE TABLE reports (
	id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	sr_sop_instance_uid VARCHAR(64), 
	sr_series_instance_uid VARCHAR(64), 
	files JSON NOT NULL, 
	summary JSON NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (version_id), 
	FOREIGN KEY(version_id) REFERENCES study_versions (id)
);
INSERT INTO "reports" VALUES(1,1,1,1,'2.25.100000000000000000000000000000000022','2.25.100000000000000000000000000000000021','["reports/2.25.100000000000000000000000000000000001/v1/sr.dcm"]','{"cannot_grade": false, "available_roles": ["FLAIR", "T1"], "missing_roles": ["T1C", "T2"], "models": [{"family": "promptnet", "checkpoint": "0123456789ab", "device": "cpu", "seconds": 12.345, "findings": {"idh": {"label": "IDH-wildtype", "probability": 0.8123, "positive_class": "IDH-wildtype"}}}], "quality_flags": [], "declined": [], "gate_loosened": false, "report_sent": true}',1714000079.0);
CREATE TABLE series (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16), 
	series_number INTEGER, 
	series_description VARCHAR(128), 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	UNIQUE (series_instance_uid)
);
INSERT INTO "series" VALUES(1,1,'2.25.100000000000000000000000000000000011','MR',3,'t1_mprage_sag',1714000001.0);
INSERT INTO "series" VALUES(2,1,'2.25.100000000000000000000000000000000012','MR',5,'t2_flair_tra',1714000003.0);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_instance_uid)
);
INSERT INTO "studies" VALUES(1,'2.25.100000000000000000000000000000000001',1714000001.0);
CREATE TABLE study_versions (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	opened_at FLOAT NOT NULL, 
	last_instance_at FLOAT NOT NULL, 
	released_at FLOAT, 
	completed_at FLOAT, 
	complete_reason VARCHAR(64), 
	new_instances INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_id, version), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "study_versions" VALUES(1,1,1,'complete',1714000001.0,1714000004.0,1714000005.0,1714000035.0,'quiet_period',4);
CREATE TABLE version_series (
	id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	series_id INTEGER NOT NULL, 
	role VARCHAR(16) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	evidence JSON NOT NULL, 
	chosen_over JSON NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (version_id, series_id), 
	FOREIGN KEY(version_id) REFERENCES study_versions (id), 
	FOREIGN KEY(series_id) REFERENCES series (id)
);
INSERT INTO "version_series" VALUES(1,1,1,'T1','selected','3D T1-weighted gradient echo','["ScanningSequence=GR", "MRAcquisitionType=3D"]','[]');
INSERT INTO "version_series" VALUES(2,1,2,'FLAIR','selected','inversion recovery with long TI','["ScanningSequence=IR", "InversionTime=2500"]','[]');
CREATE INDEX ix_deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX ix_deliveries_study_id ON deliveries (study_id);
CREATE INDEX ix_events_at ON events (at);
CREATE INDEX ix_events_kind ON events (kind);
CREATE INDEX ix_events_study_id ON events (study_id);
CREATE INDEX ix_instances_series_id ON instances (series_id);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_study_id ON jobs (study_id);
CREATE INDEX ix_jobs_version_id ON jobs (version_id);
CREATE INDEX ix_reports_study_id ON reports (study_id);
CREATE INDEX ix_series_study_id ON series (study_id);
CREATE INDEX ix_study_versions_state ON study_versions (state);
CREATE INDEX ix_study_versions_study_id ON study_versions (study_id);
CREATE INDEX ix_version_series_version_id ON version_series (version_id);
COMMIT;
